"""Model versions and aliases at any storage URL: what is in production, what it replaced, and why.

Layout (format version 1)::

    REGISTRY/registry.json                     {"format": "signscale.registry", "format_version": 1}
    REGISTRY/versions/v000003/claim            create-only: allocates the id (two writers never share one)
    REGISTRY/versions/v000003/model/           the model artefact, copied and checksum-verified
    REGISTRY/versions/v000003/version.json     metadata, written last: lineage, metrics, config
    REGISTRY/aliases/production                pointer: {"version", "previous": [...], "seq", ...}
    REGISTRY/aliases/candidate                 pointer
    REGISTRY/history/<time_ns>-<rand>.json     one immutable object per event, never rewritten

Versions are immutable: once ``version.json`` exists nothing under that folder changes. Aliases are
small pointer objects moved with :func:`pointers.write_pointer`: a rename on local disk, a conditional
PUT (If-Match / If-None-Match) on object stores, so of two writers racing to move the same alias
exactly one wins and the other gets :class:`AliasConflict`. ``previous`` is not a separate object:
the production pointer carries the stack of versions it replaced, so production and previous move
together in one atomic write and ``rollback`` can never restore a version that was not production.

Every alias move, every rejected candidate and every registration appends an event to the history
with the reason and the numbers behind it (the gate's decision), so ``signscale registry show``
can answer "why is this model in production".
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from signscale import pointers, storage

REGISTRY_FORMAT = 1
ALIASES = ("production", "candidate")
PREVIOUS = "previous"  # virtual alias: the version production replaced last
_ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_VERSION_RE = re.compile(r"^v(\d{6,})$")
# Sentinel for "whatever the alias points to now": the move is still atomic against that read.
CURRENT = object()


class RegistryError(ValueError):
    """A registry operation that cannot be done as asked; the message names the version or alias."""


class AliasConflict(RegistryError):
    """Another writer moved the alias first (or it no longer points where the caller expected)."""


@dataclass(frozen=True)
class Version:
    """One immutable model version."""

    id: str
    model_url: str
    created: str
    parent: str | None = None
    dataset: dict[str, Any] = field(default_factory=dict)  # {"url", "version", "checksum", ...}
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    sha256: str = ""
    label_space: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "model": "model", "created": self.created, "parent": self.parent,
                "dataset": self.dataset, "metrics": self.metrics, "config": self.config, "note": self.note,
                "sha256": self.sha256, "label_space": self.label_space}


@dataclass(frozen=True)
class Alias:
    name: str
    version: str
    previous: tuple[str, ...]
    changed: str
    reason: str
    token: str  # storage token of the pointer: pass to a conditional write


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def split_spec(spec: str) -> tuple[str, str]:
    """``"s3://bucket/reg@production"`` -> (registry URL, alias or version id)."""
    url, sep, ref = spec.rpartition("@")
    if not sep or not url or not ref:
        raise RegistryError(f"{spec!r}: expected REGISTRY_URL@ALIAS (e.g. s3://models/signs@production) "
                            "or REGISTRY_URL@VERSION (e.g. ...@v000003)")
    return url, ref


def resolve(spec: str) -> tuple[str, str]:
    """``"REGISTRY_URL@alias"`` (or ``@v000003``) -> (version id, model artefact URL)."""
    url, ref = split_spec(spec)
    reg = Registry(url)
    version = reg.get(reg.ref(ref))
    return version.id, version.model_url


class Registry:
    """A model registry rooted at a storage URL (local path, s3://, gs://, az://)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    # -- layout ----------------------------------------------------------------------------------

    def _versions_dir(self) -> str:
        return storage.join(self.url, "versions")

    def _version_dir(self, vid: str) -> str:
        return storage.join(self.url, "versions", vid)

    def _alias_url(self, name: str) -> str:
        return storage.join(self.url, "aliases", name)

    def _ensure(self) -> None:
        marker = storage.join(self.url, "registry.json")
        if storage.exists(marker):
            meta = storage.read_json(marker)
            if meta.get("format") != "signscale.registry" or meta.get("format_version") != REGISTRY_FORMAT:
                raise RegistryError(f"{marker}: registry format {meta.get('format_version')!r} is not supported "
                                    f"(this signscale reads {REGISTRY_FORMAT})")
            return
        storage.makedirs(self.url)
        try:
            pointers.write_pointer(marker, json.dumps({"format": "signscale.registry",
                                                      "format_version": REGISTRY_FORMAT}).encode(), expect=None)
        except storage.PreconditionFailed:
            pass  # another writer created it first: same content

    # -- versions ---------------------------------------------------------------------------------

    def version_ids(self) -> list[str]:
        """Ids of complete versions (their version.json exists), oldest first."""
        try:
            entries = storage.listdir(self._versions_dir())
        except FileNotFoundError:
            return []
        ids = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        ids = [i for i in ids if _VERSION_RE.match(i)]
        return sorted((i for i in ids if storage.exists(storage.join(self._version_dir(i), "version.json"))),
                      key=lambda i: int(i[1:]))

    def _claim_id(self) -> str:
        """Allocate the next version id with a create-only write: concurrent registrations get distinct ids."""
        try:
            entries = storage.listdir(self._versions_dir())
            taken = [int(m.group(1)) for e in entries if (m := _VERSION_RE.match(e.rstrip("/").rsplit("/", 1)[-1]))]
        except FileNotFoundError:
            taken = []
        n = max(taken, default=0) + 1
        while True:
            vid = f"v{n:06d}"
            try:
                pointers.write_pointer(storage.join(self._version_dir(vid), "claim"),
                                      json.dumps({"claimed": _now()}).encode(), expect=None)
                return vid
            except storage.PreconditionFailed:
                n += 1

    def register(self, model_url: str, *, parent: str | None = None, dataset: dict[str, Any] | None = None,
                 metrics: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
                 note: str = "") -> Version:
        """Copy a model artefact into the registry as a new immutable version; returns it.

        The copy is checksum-verified against the artefact's model.json; version.json is written last,
        so a crash leaves at most an unlisted, incomplete folder, never a listed broken version.
        """
        self._ensure()
        src = model_url[: -len("/model.pt")] if model_url.endswith("/model.pt") else model_url.rstrip("/")
        meta_url = storage.join(src, "model.json")
        if not storage.exists(meta_url):
            raise RegistryError(f"{src}: no model.json; register a model artefact folder (e.g. runs/x/model)")
        meta = storage.read_json(meta_url)
        weights = storage.read_bytes(storage.join(src, "model.pt"))
        import hashlib

        if hashlib.sha256(weights).hexdigest() != meta.get("sha256"):
            raise RegistryError(f"{src}/model.pt: sha256 does not match model.json (corrupt or replaced); "
                                "re-export the model")
        if parent is not None:
            self.get(parent)  # must exist
        vid = self._claim_id()
        vdir = self._version_dir(vid)
        storage.write_bytes(storage.join(vdir, "model", "model.pt"), weights)
        storage.write_json(storage.join(vdir, "model", "model.json"), meta)
        version = Version(id=vid, model_url=storage.join(vdir, "model"), created=_now(), parent=parent,
                          dataset=dict(dataset or {}), metrics=dict(metrics or {}), config=dict(config or {}),
                          note=note, sha256=str(meta.get("sha256", "")),
                          label_space=str(meta.get("label_space", {}).get("name", "")))
        storage.write_json(storage.join(vdir, "version.json"), version.to_dict())
        self._event("register", version=vid, reason=note or "registered",
                    evidence={"parent": parent, "dataset": version.dataset, "metrics": version.metrics})
        return version

    def get(self, vid: str) -> Version:
        url = storage.join(self._version_dir(vid), "version.json")
        if not _VERSION_RE.match(vid) or not storage.exists(url):
            known = ", ".join(self.version_ids()[-5:]) or "none"
            raise RegistryError(f"{self.url}: no version {vid!r} (latest: {known})")
        d = storage.read_json(url)
        return Version(id=d["id"], model_url=storage.join(self._version_dir(vid), d.get("model", "model")),
                       created=d["created"], parent=d.get("parent"), dataset=d.get("dataset", {}),
                       metrics=d.get("metrics", {}), config=d.get("config", {}), note=d.get("note", ""),
                       sha256=d.get("sha256", ""), label_space=d.get("label_space", ""))

    def ref(self, ref: str) -> str:
        """A version id from an alias name, ``previous`` or a version id."""
        if _VERSION_RE.match(ref):
            return ref
        if ref == PREVIOUS:
            prod = self.alias("production")
            if prod is None or not prod.previous:
                raise RegistryError(f"{self.url}: no previous production version to refer to")
            return prod.previous[0]
        a = self.alias(ref)
        if a is None:
            raise RegistryError(
                f"{self.url}: alias {ref!r} is not set (aliases: {', '.join(self.aliases()) or 'none'})"
            )
        return a.version

    # -- aliases ----------------------------------------------------------------------------------

    def aliases(self) -> list[str]:
        try:
            names = [u.rstrip("/").rsplit("/", 1)[-1] for u in storage.listdir(storage.join(self.url, "aliases"))]
            return sorted(n for n in names if _ALIAS_RE.match(n))  # skips local lock files (.NAME.lock)
        except FileNotFoundError:
            return []

    def alias(self, name: str) -> Alias | None:
        try:
            data, token = pointers.read_pointer(self._alias_url(name))
        except FileNotFoundError:
            return None
        d = json.loads(data)
        return Alias(name=name, version=d["version"], previous=tuple(d.get("previous", [])),
                     changed=d.get("changed", ""), reason=d.get("reason", ""), token=token)

    def set_alias(self, name: str, version: str, *, expect: Any = CURRENT, reason: str = "",
                  evidence: dict[str, Any] | None = None, event: str = "alias",
                  previous: tuple[str, ...] | None = None) -> Alias:
        """Point alias ``name`` at ``version`` atomically.

        ``expect``: the version id the alias must point to now (None: must be unset); the default
        ``CURRENT`` means "whatever it points to when read here" (still atomic against that read).
        Raises :class:`AliasConflict` when the alias moved meanwhile.
        """
        if not _ALIAS_RE.match(name) or name == PREVIOUS:
            raise RegistryError(f"alias {name!r}: use a lower-case name such as production or candidate "
                                f"({PREVIOUS!r} is derived from production and cannot be set)")
        self._ensure()
        self.get(version)
        cur = self.alias(name)
        if expect is not CURRENT:
            now = cur.version if cur else None
            if now != expect:
                raise AliasConflict(f"{self.url}: alias {name!r} points to {now or 'nothing'}, expected "
                                    f"{expect or 'nothing'}; another writer moved it; re-read and decide again")
        if previous is None:
            previous = (cur.version, *cur.previous)[:20] if cur and cur.version != version else \
                (cur.previous if cur else ())
        body = {"alias": name, "version": version, "previous": list(previous), "changed": _now(),
                "reason": reason, "seq": uuid.uuid4().hex}
        try:
            token = pointers.write_pointer(self._alias_url(name), json.dumps(body).encode(),
                                          expect=cur.token if cur else None)
        except storage.PreconditionFailed:
            raise AliasConflict(f"{self.url}: alias {name!r} was moved by another writer while this one "
                                f"tried to point it at {version}; re-read and decide again") from None
        self._event(event, alias=name, version=version, previous=cur.version if cur else None, reason=reason,
                    evidence=evidence or {})
        return Alias(name=name, version=version, previous=tuple(previous), changed=body["changed"],
                     reason=reason, token=token)

    def promote(self, version: str, *, expect: Any = CURRENT, reason: str = "",
                evidence: dict[str, Any] | None = None) -> Alias:
        """Make ``version`` production; the one it replaces becomes ``previous``.

        Pass ``expect`` = the production version the decision was made against (the gate compared the
        candidate with it): if production moved meanwhile, the promotion fails instead of silently
        replacing a model nobody compared against.
        """
        return self.set_alias("production", version, expect=expect, reason=reason or "promoted",
                              evidence=evidence, event="promote")

    def rollback(self, *, reason: str = "") -> Alias:
        """Point production back at ``previous`` (atomic against the current production)."""
        cur = self.alias("production")
        if cur is None or not cur.previous:
            raise RegistryError(f"{self.url}: nothing to roll back to (production has no previous version)")
        return self.set_alias("production", cur.previous[0], expect=cur.version,
                              reason=reason or f"rollback from {cur.version}", event="rollback",
                              previous=cur.previous[1:])

    def reject(self, version: str | None, *, reason: str, evidence: dict[str, Any] | None = None) -> None:
        """Record that ``version`` (None: a batch, before any model was trained) was not promoted.

        Production is not touched; the event keeps the reason and the numbers behind it.
        """
        if version is not None:
            self.get(version)
        prod = self.alias("production")
        self._event("reject", version=version, previous=prod.version if prod else None, reason=reason,
                    evidence=evidence or {})

    # -- history ----------------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> None:
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
        storage.write_json(storage.join(self.url, "history", name), {"event": kind, "time": _now(), **fields})

    def history(self) -> list[dict[str, Any]]:
        """Every event, oldest first."""
        try:
            urls = storage.listdir(storage.join(self.url, "history"))
        except FileNotFoundError:
            return []
        return [storage.read_json(u) for u in sorted(urls) if u.endswith(".json")]


def describe_event(e: dict[str, Any]) -> str:
    """One line for ``registry show``: what happened, to which version, and why."""
    kind = e.get("event", "?")
    v = e.get("version", "")
    if kind == "register":
        head = f"registered {v}" + (f" (parent {e['evidence'].get('parent')})" if e.get("evidence", {}).get("parent")
                                    else "")
    elif kind in ("promote", "rollback", "alias"):
        head = f"{e.get('alias', 'production')}: {e.get('previous') or '-'} -> {v} ({kind})"
    elif kind == "reject":
        what = v or f"batch {e.get('evidence', {}).get('batch', '?')} before training"
        head = f"rejected {what} (production stays {e.get('previous') or '-'})"
    else:
        head = f"{kind} {v}"
    return f"{e.get('time', '')}  {head}: {e.get('reason', '')}"
