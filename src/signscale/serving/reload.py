"""The serving model and its hot reload: a slot that holds the model in service, a poller that
watches the model folder or registry alias, and the refusals that keep a half-written or corrupt
version out (retried, so a folder that becomes consistent is served)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from signscale import storage
from signscale.serving.predict import Predictor

log = logging.getLogger("signscale.serving.serve")  # the service's log: reloads are its events

ModelSource = Callable[[], tuple[str, str]]  # () -> (version, model URL)


@dataclass(frozen=True)
class Refusal:
    """A model version that failed to load or warm up, and the state of its folder when it did."""

    version: str
    url: str
    reason: str
    since: float  # wall-clock time of its first refusal
    last_tried: float
    attempts: int
    stamp: str | None  # the folder's listing (names, sizes, times) before the failed load; None: unknown

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "url": self.url, "reason": self.reason, "since": _iso(self.since),
                "last_tried": _iso(self.last_tried), "attempts": self.attempts}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def folder_stamp(url: str) -> str:
    """What a model folder holds, cheaply: each entry's name, size and modification time (or ETag).

    A refused version is tried again only when this changes: a folder written non-atomically (its
    model.json before its weights) is refused mid-write and served once the write completes, while a
    truly broken version is not reloaded at every poll.
    """
    fs, path = storage.filesystem(url)
    fs.invalidate_cache(path)  # object-store listings are cached by fsspec; a stale one would hide the change
    entries = fs.ls(path, detail=True)
    keys = ("size", "mtime", "ino", "LastModified", "ETag", "etag", "md5Hash", "updated", "last_modified")
    return json.dumps(sorted([str(e.get("name")), *(str(e.get(k)) for k in keys if k in e)] for e in entries))


class ModelSlot:
    """Holds the serving :class:`Predictor`; :meth:`poll` loads a new version beside it and swaps.

    Generic over the *source* (a callable returning ``(version, url)``), so a registry alias, a
    pointer file or a test can drive it. The swap is one attribute assignment (atomic in Python);
    readers take ``slot.current`` once per batch and keep that reference. A version that fails to
    load is remembered with its folder's ``stamp`` and tried again only when that changes.
    """

    def __init__(self, source: ModelSource, load: Callable[[str, str], Predictor], *,
                 on_event: Callable[[str, str, str], None] | None = None,
                 stamp: Callable[[str], str] = folder_stamp) -> None:
        self._source = source
        self._load = load
        self._stamp = stamp
        self._on_event = on_event or (lambda result, version, detail: None)
        self._lock = threading.Lock()  # one reload at a time
        self._refused: dict[str, Refusal] = {}  # version -> why it does not serve
        self.current: Predictor | None = None

    def start(self) -> Predictor:
        """Load the first model; unlike a reload, a failure here stops the service from starting."""
        version, url = self._source()
        self.current = self._prepare(url, version)
        self._on_event("loaded", version, url)
        return self.current

    def _prepare(self, url: str, version: str) -> Predictor:
        predictor = self._load(url, version)
        predictor.warmup()
        return predictor

    def poll(self) -> str:
        """Check the source once: ``unchanged``, ``swapped``, ``refused`` (load/warm-up failed) or ``error``."""
        with self._lock:
            try:
                version, url = self._source()
            except Exception as exc:  # noqa: BLE001 - a flaky registry must not stop the service
                self._on_event("source_error", "", f"{type(exc).__name__}: {exc}")
                return "error"
            current = self.current
            if current is not None and version == current.version:
                return "unchanged"
            stamp = self._stamp_of(url)  # before the load: a write during it shows at the next poll
            before = self._refused.get(version)
            if before is not None and before.url == url and stamp is not None and before.stamp == stamp:
                return "unchanged"
            try:
                fresh = self._prepare(url, version)
            except Exception as exc:  # noqa: BLE001 - whatever broke, the old model keeps serving
                why = f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, OSError):  # transient reads are retried at the next poll
                    now = time.time()
                    self._refused[version] = Refusal(version, url, why, before.since if before else now, now,
                                                     (before.attempts if before else 0) + 1, stamp)
                self._on_event("refused", version, why)
                return "refused"
            self._refused.pop(version, None)
            self.current = fresh
            self._on_event("swapped", version, url)
            return "swapped"

    def _stamp_of(self, url: str) -> str | None:
        try:
            return self._stamp(url)
        except Exception as exc:  # noqa: BLE001 - unknown: a refused version is then tried at every poll
            log.debug("cannot list %s (%s): a refusal there is retried at every poll", url, exc)
            return None

    def refused(self) -> dict[str, str]:
        """version -> why it was refused (its latest attempt)."""
        return {v: r.reason for v, r in self._refused.items()}

    def refusals(self) -> list[Refusal]:
        return sorted(self._refused.values(), key=lambda r: r.since)


class _Poller:
    """A daemon thread calling ``slot.poll()`` every ``interval`` seconds until stopped."""

    def __init__(self, slot: ModelSlot, interval: float) -> None:
        self._slot, self._interval = slot, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="signscale-model-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._slot.poll()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
