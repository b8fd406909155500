"""A dataset's manifest (its shards, their checksums and what the records mean; written last, so its
presence means every shard it names is complete) and ``signscale data verify``, which checks every
shard against it."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from signscale import storage
from signscale.data import shards
from signscale.data.shards import MANIFEST_FORMAT, SHARD_FORMAT, Encoding, ShardError, ShardReader
from signscale.data.sources.base import CONDITIONS
from signscale.labels import COUNTRIES, LabelSpace


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset root
    sha256: str
    bytes: int
    count: int
    class_histogram: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes, "count": self.count,
                "class_histogram": list(self.class_histogram)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardInfo":
        return cls(path=d["path"], sha256=d["sha256"], bytes=int(d["bytes"]), count=int(d["count"]),
                   class_histogram=tuple(int(x) for x in d["class_histogram"]))


class Manifest:
    """A dataset's manifest: the shards, their checksums and what the records mean."""

    NAME = "manifest.json"

    def __init__(self, root: str, data: dict[str, Any]) -> None:
        self.root = root.rstrip("/")
        self.data = data
        self.shards = [ShardInfo.from_dict(s) for s in data["shards"]]
        self.label_space = LabelSpace.from_dict(data["label_space"])
        counts = np.array([s.count for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @classmethod
    def load(cls, url: str) -> "Manifest":
        root = url[: -len(cls.NAME)].rstrip("/") if url.endswith(cls.NAME) else url.rstrip("/")
        murl = storage.join(root, cls.NAME)
        if not storage.exists(murl):
            raise ShardError(f"{murl}: no manifest. Is {root!r} a signscale dataset? "
                             f"Create one with `signscale pack SOURCE {root}`")
        data = storage.read_json(murl)
        if data.get("format") != "signscale.dataset":
            raise ShardError(f"{murl}: not a signscale dataset manifest")
        if data.get("format_version") != MANIFEST_FORMAT:
            raise ShardError(f"{murl}: manifest format {data.get('format_version')} is not supported "
                             f"(this signscale reads {MANIFEST_FORMAT})")
        return cls(root, data)

    @property
    def count(self) -> int:
        return int(self.starts[-1])

    def shard_format(self) -> int:
        """The shards' format (2: block sums); older manifests did not record it: the first shard's
        header says (one small read; a shard that cannot be read counts as checked, as its read fails
        later with its own error)."""
        if "shard_format" in self.data:
            return int(self.data["shard_format"])
        try:
            return SHARD_FORMAT if ShardReader(self.shard_url(0)).checked else 1
        except (OSError, ShardError):
            return SHARD_FORMAT

    @property
    def encoding(self) -> Encoding:
        return self.data["encoding"]

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        s = self.data.get("image_shape")
        return tuple(s) if s else None

    @property
    def conditions(self) -> list[str]:
        return list(self.data["conditions"])

    @property
    def countries(self) -> list[str]:
        return list(self.data["countries"])

    @property
    def name(self) -> str:
        return str(self.data.get("name", ""))

    def shard_url(self, i: int) -> str:
        return storage.join(self.root, self.shards[i].path)

    def class_histogram(self) -> np.ndarray:
        return np.sum([s.class_histogram for s in self.shards], axis=0) if self.shards else np.zeros(0, np.int64)

    def locate(self, position: int) -> tuple[int, int]:
        """(shard index, record index within the shard) of dataset position ``position``."""
        shard = int(np.searchsorted(self.starts, position, side="right") - 1)
        return shard, position - int(self.starts[shard])

    def checksum(self) -> str:
        """One hash over every shard's sha256: equal datasets have equal checksums."""
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s.path}:{s.sha256}:{s.count}\n".encode())
        return h.hexdigest()


def verify(url: str, *, progress: Any = None) -> list[str]:
    """Re-hash every shard and check headers and counts; returns a list of problems (empty: OK)."""
    m = Manifest.load(url)
    problems: list[str] = []
    for i, s in enumerate(m.shards):
        surl = m.shard_url(i)
        try:
            if not storage.exists(surl):
                problems.append(f"{s.path}: missing")
                continue
            size = storage.size(surl)
            if size != s.bytes:
                problems.append(f"{s.path}: size {size} bytes, manifest says {s.bytes} (truncated or replaced)")
                continue
            digest = storage.sha256_of(surl)
            if digest != s.sha256:
                problems.append(f"{s.path}: sha256 mismatch (content changed or corrupt){_where_corrupt(surl)}")
                continue
            header = ShardReader(surl).header
            if header["count"] != s.count:
                problems.append(f"{s.path}: header count {header['count']} != manifest count {s.count}")
        except ShardError as exc:
            problems.append(str(exc))
        finally:
            if progress is not None:
                progress(i)
    return problems


def _where_corrupt(url: str) -> str:
    """Which blocks of a shard fail their sums (format 2), to say how much of it is lost."""
    try:
        reader = ShardReader(url) if storage.is_local(url) else ShardReader(url, data=storage.read_bytes(url))
        if not reader.checked:
            return "; format 1 shard (no block sums): re-pack the dataset"
        bad = reader.scan()
    except ShardError as exc:
        return f"; {exc}"
    if not bad:
        return "; every block matches its sum (the change is outside the checked bytes, e.g. header padding)"
    spans = ", ".join(f"{b} (records {lo}..{hi - 1})" for b in bad[:8] for lo, hi in [reader.block_range(b)])
    return f"; corrupt block(s) {spans}{' ...' if len(bad) > 8 else ''} of {reader.sums.blocks if reader.sums else 0}"


def write_dataset_index(out: str, *, name: str, source: dict[str, Any], encoding: str, record_dtype: np.dtype,
                        label_space: LabelSpace, shard_infos: list[dict[str, Any]], sources: list[str],
                        quarantine: list[dict[str, Any]], image_shape: list[int] | None = None,
                        extra: dict[str, Any] | None = None, totals: dict[str, Any] | None = None) -> Manifest:
    """Write a dataset's index once its shards are written: ``quarantine.jsonl``, then ``manifest.json``
    LAST, so its presence means every shard it names is complete. The one place every writer of a
    dataset (pack, scene packing, dataset versions) builds the manifest, so all carry the same keys."""
    lines = "".join(json.dumps(q) + "\n" for q in quarantine)
    storage.write_bytes(storage.join(out, "quarantine.jsonl"), lines.encode())
    by_reason = dict(Counter(q["reason"] for q in quarantine))
    hist = np.sum([s["class_histogram"] for s in shard_infos], axis=0) if shard_infos else np.zeros(0)
    manifest = {
        "format": "signscale.dataset", "format_version": MANIFEST_FORMAT, "shard_format": SHARD_FORMAT,
        "name": name, "version": 1, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source, "encoding": encoding, "image_shape": image_shape,
        "record_dtype": shards.dtype_to_json(record_dtype), "label_space": label_space.to_dict(),
        "conditions": list(CONDITIONS), "countries": list(COUNTRIES), "sources": sources,
        "shards": shard_infos,
        "totals": {"count": sum(s["count"] for s in shard_infos), "shards": len(shard_infos),
                   "bytes": sum(s["bytes"] for s in shard_infos), "classes": int(np.count_nonzero(hist)),
                   **(totals or {})},
        "quarantine": {"count": len(quarantine), "by_reason": by_reason, "file": "quarantine.jsonl"},
        **(extra or {}),
    }
    storage.write_json(storage.join(out, Manifest.NAME), manifest)
    return Manifest(out.rstrip("/"), manifest)
