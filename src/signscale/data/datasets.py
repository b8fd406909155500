"""Dataset versions: appended batches, immutable version manifests and one head pointer.

A packed dataset (``signscale pack``) is version 1. Each accepted batch of new data (``ingest``) is
packed as a dataset of its own under ``batches/`` and published as the next version::

    DATASET/manifest.json             version 1, exactly as pack wrote it (never modified)
    DATASET/shards/...                its shards
    DATASET/batches/b000002/          one ingested batch: manifest.json, shards/, records.jsonl, ...
    DATASET/_versions/v000002-<h>.json  version 2: every shard of version 1 plus the batch's, by path
    DATASET/_versions/HEAD            {"version": 2, "manifest": "v000002-<h>.json"}: the pointer readers follow

Publishing writes the version manifest create-only (named by version and batch, so a manifest left by
a publisher that crashed before moving HEAD is inert and never blocks another), then moves ``HEAD``
with a conditional write
(:func:`pointers.write_pointer`), the way lakeFS merges a branch or Iceberg swaps a table's metadata
file: a reader sees the old version or the new one, never a mix, and a batch that was never
published (rejected by validation or by the promotion gate) appears in no version manifest. Old
version manifests and shards are never rewritten, so a model's lineage ("trained on version 3")
stays reproducible.

A version manifest is a complete manifest in the pack format (``docs/format.md``) with shard paths
relative to the dataset root, plus ``parts``: the packed datasets it is made of, so training can
weight old and new data separately (a replay mix) with ``TrainConfig(data=version.parts, weights=...)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from signscale import pointers, storage
from signscale.data import shards
from signscale.data.manifest import Manifest, write_dataset_index
from signscale.labels import LabelSpace

VERSIONS_DIR = "_versions"
HEAD = "HEAD"
BATCHES_DIR = "batches"
CURRENT = object()  # publish(): "against whatever HEAD is when read"


class DatasetVersionError(ValueError):
    """A dataset version that cannot be read or published; the message names the file and the fix."""


class HeadMoved(DatasetVersionError):
    """Another writer published a version first."""


@dataclass(frozen=True)
class DatasetVersion:
    """One published version of a dataset."""

    root: str
    version: int
    parts: tuple[str, ...]  # packed dataset URLs, oldest first (version 1's root, then batches)
    checksum: str
    count: int
    created: str = ""
    batch: str = ""  # the batch this version added ("" for version 1)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # class/country/condition -> counts
    name: str = ""  # the version manifest's file name under _versions/ ("" for version 1)
    parent_name: str = ""

    @property
    def spec(self) -> str:
        return f"{self.root}@v{self.version}"

    def manifest(self) -> Manifest:
        """All the version's shards as one manifest (paths relative to the dataset root)."""
        if self.version == 1:
            return Manifest.load(self.root)
        return Manifest(self.root, storage.read_json(_version_url(self.root, self.name)))

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "version": self.version, "parts": list(self.parts), "checksum": self.checksum,
                "count": self.count, "created": self.created, "batch": self.batch}


def _version_name(version: int, batch_rel: str) -> str:
    import hashlib

    return f"v{version:06d}-{hashlib.sha256(batch_rel.encode()).hexdigest()[:8]}.json"


def _version_url(root: str, name: str) -> str:
    return storage.join(root, VERSIONS_DIR, name)


def _head_url(root: str) -> str:
    return storage.join(root, VERSIONS_DIR, HEAD)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Reading


def read_head(root: str) -> tuple[str, str | None]:
    """(head version manifest name, "" for version 1; pointer token, None when nothing was ever published)."""
    root = root.rstrip("/")
    try:
        data, token = pointers.read_pointer(_head_url(root))
    except FileNotFoundError:
        if not storage.exists(storage.join(root, Manifest.NAME)):
            raise DatasetVersionError(
                f"{root}: no manifest.json; create version 1 with `signscale pack SOURCE {root}`"
            ) from None
        return "", None
    return str(json.loads(data)["manifest"]), token


def _load(root: str, name: str) -> DatasetVersion:
    if not name:
        m = Manifest.load(root)
        return DatasetVersion(root=root, version=1, parts=(root,), checksum=m.checksum(), count=m.count,
                              created=str(m.data.get("created", "")), counts=_cached_base_counts(root, m))
    url = _version_url(root, name)
    if not storage.exists(url):
        raise DatasetVersionError(f"{root}: version manifest {url} is missing; the dataset is damaged "
                                  "(version manifests are never deleted)")
    d = storage.read_json(url)
    m = Manifest(root, d)
    return DatasetVersion(root=root, version=int(d["version"]),
                          parts=tuple(storage.join(root, p["path"]) if p["path"] else root for p in d["parts"]),
                          checksum=m.checksum(), count=m.count, created=d.get("created", ""), batch=d.get("batch", ""),
                          counts=d.get("counts", {}), name=name, parent_name=d.get("parent_manifest", ""))


def head(root: str) -> DatasetVersion:
    """The version readers should use now."""
    root = root.rstrip("/")
    return _load(root, read_head(root)[0])


def versions(root: str) -> list[DatasetVersion]:
    """Every published version up to the head, oldest first (following the chain back from HEAD)."""
    root = root.rstrip("/")
    out = [head(root)]
    while out[-1].version > 1:
        out.append(_load(root, out[-1].parent_name))
    return out[::-1]


def load_version(root: str, version: int) -> DatasetVersion:
    for v in versions(root):
        if v.version == version:
            return v
    raise DatasetVersionError(f"{root}: no published version {version}; `signscale data versions {root}` lists them")


def resolve(spec: str) -> DatasetVersion:
    """``DATASET`` (the head) or ``DATASET@v3`` -> that version."""
    root, sep, ref = spec.rpartition("@v")
    if sep and ref.isdigit():
        return load_version(root.rstrip("/"), int(ref))
    return head(spec)


# ---------------------------------------------------------------------------------------------
# Counts per class, country and condition


def record_counts(manifest: Manifest) -> dict[str, dict[str, int]]:
    """Counts per class key, country and condition, from the records' metadata (reads every shard once)."""
    space = manifest.label_space
    labels = np.zeros(len(space), dtype=np.int64)
    cond = np.zeros(max(1, len(manifest.conditions)), dtype=np.int64)
    country = np.zeros(max(1, len(manifest.countries)), dtype=np.int64)
    for i in range(len(manifest.shards)):
        r = shards.ShardReader(manifest.shard_url(i)).records()
        labels += np.bincount(r["label"], minlength=len(labels))[: len(labels)]
        cond += np.bincount(r["condition"], minlength=len(cond))[: len(cond)]
        country += np.bincount(r["country"], minlength=len(country))[: len(country)]
    return counts_dict(labels, country, cond, space, manifest.countries, manifest.conditions)


def counts_dict(labels: np.ndarray, country: np.ndarray, cond: np.ndarray, space: LabelSpace,
                countries: list[str], conditions: list[str]) -> dict[str, dict[str, int]]:
    return {"class": {space[i].key: int(n) for i, n in enumerate(labels) if n},
            "country": {countries[i]: int(n) for i, n in enumerate(country) if n},
            "condition": {conditions[i]: int(n) for i, n in enumerate(cond) if n}}


def add_counts(a: dict[str, dict[str, int]], b: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for kind in ("class", "country", "condition"):
        merged = dict(a.get(kind, {}))
        for k, n in b.get(kind, {}).items():
            merged[k] = merged.get(k, 0) + int(n)
        out[kind] = merged
    return out


def _cached_base_counts(root: str, m: Manifest) -> dict[str, dict[str, int]]:
    """Version 1's counts, computed once and kept beside the versions (the base manifest is never touched)."""
    url = storage.join(root, VERSIONS_DIR, "v000001.counts.json")
    if storage.exists(url):
        d = storage.read_json(url)
        if d.get("checksum") == m.checksum():
            return d["counts"]
    counts = record_counts(m)
    try:
        storage.write_json(url, {"checksum": m.checksum(), "counts": counts})
    except OSError:
        pass  # a read-only dataset: counts are recomputed next time
    return counts


# ---------------------------------------------------------------------------------------------
# Writing a packed dataset from records (ingested batches, evaluation sets)


def write_dataset(out: str, records: np.ndarray, *, label_space: LabelSpace, name: str,
                  source: dict[str, Any] | None = None, records_per_shard: int = 20_000,
                  quarantine: list[dict[str, Any]] | None = None, extra: dict[str, Any] | None = None) -> Manifest:
    """Write raw-encoded ``records`` (dtype from :func:`shards.record_dtype`) as a packed dataset at ``out``.

    Same format as ``pack``: shards first (atomically, each checksummed), ``quarantine.jsonl``, then
    ``manifest.json`` last. Deterministic: the same records give byte-identical shards.
    """
    out = out.rstrip("/")
    storage.makedirs(out)
    if records.dtype.names is None or "image" not in records.dtype.names:
        raise ValueError("write_dataset: records must be a raw record array with an 'image' field")
    shard_infos = []
    for c, start in enumerate(range(0, len(records), records_per_shard)):
        part = records[start:start + records_per_shard]
        path = f"shards/shard-{c:05d}.sgs"
        data = shards.encode_raw_shard(part)
        sha = storage.write_bytes(storage.join(out, path), data)
        hist = np.bincount(part["label"], minlength=len(label_space))[: len(label_space)]
        shard_infos.append({"path": path, "sha256": sha, "bytes": len(data), "count": int(len(part)),
                            "class_histogram": [int(x) for x in hist]})
    return write_dataset_index(
        out, name=name, source=source or {"kind": "records"}, encoding="raw", record_dtype=records.dtype,
        label_space=label_space, shard_infos=shard_infos, sources=[name], quarantine=quarantine or [],
        image_shape=list(records.dtype["image"].shape), extra={"records_per_chunk": records_per_shard, **(extra or {})})


def read_records(manifest: Manifest) -> np.ndarray:
    """Every record of a raw dataset as one array (small datasets: evaluation sets, batches)."""
    if manifest.encoding != "raw":
        raise DatasetVersionError(f"{manifest.root}: read_records needs a raw-encoded dataset (pack --encoding raw)")
    parts = [np.array(shards.ShardReader(manifest.shard_url(i)).records()) for i in range(len(manifest.shards))]
    if not parts:
        dt = shards.record_dtype("raw", manifest.image_shape or (32, 32, 3))
        return np.zeros(0, dtype=dt)
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------------------
# Publishing


def _check_compatible(base: Manifest, batch: Manifest) -> None:
    if batch.label_space.fingerprint() != base.label_space.fingerprint():
        raise DatasetVersionError(f"{batch.root}: label space {batch.label_space.name!r} differs from the dataset's "
                                  f"({base.label_space.name!r}); ingest with the dataset's label space")
    if batch.encoding != base.encoding or batch.image_shape != base.image_shape:
        raise DatasetVersionError(f"{batch.root}: {batch.encoding} {batch.image_shape} records do not match the "
                                  f"dataset's {base.encoding} {base.image_shape}")
    if batch.conditions != base.conditions or batch.countries != base.countries:
        raise DatasetVersionError(f"{batch.root}: condition/country tables differ from the dataset's")


def publish(root: str, batch_url: str, *, expect: Any = CURRENT, counts: dict[str, dict[str, int]] | None = None,
            note: str = "") -> DatasetVersion:
    """Publish the packed batch at ``batch_url`` (under ``root/batches/``) as the next version.

    ``expect``: the head version the batch was validated against (default: the head read here).
    Raises :class:`HeadMoved` when another writer published first. Idempotent for a crash between
    the two writes: re-publishing the same batch reuses its version manifest.
    """
    root = root.rstrip("/")
    batch_url = batch_url.rstrip("/")
    prefix = storage.join(root, BATCHES_DIR) + "/"
    if not batch_url.startswith(prefix):
        raise DatasetVersionError(f"{batch_url}: a batch must live under {prefix} to be published into {root}")
    rel = batch_url[len(root) + 1:]
    cur_name, token = read_head(root)
    chain = versions(root)
    parent = chain[-1]
    cur = parent.version
    if expect is not CURRENT and expect != cur:
        raise HeadMoved(f"{root}: head is version {cur}, expected {expect}; another batch was published first")
    for v in chain:
        if v.batch == rel:
            return v  # already published (a re-run after a crash)
    base, batch = parent.manifest(), Manifest.load(batch_url)
    _check_compatible(base, batch)
    data = dict(base.data)
    data["shards"] = [s.to_dict() for s in base.shards] + [dict(s.to_dict(), path=f"{rel}/{s.path}")
                                                          for s in batch.shards]
    data["totals"] = {"count": base.count + batch.count, "shards": len(data["shards"]),
                      "bytes": sum(s["bytes"] for s in data["shards"]),
                      "classes": int(np.count_nonzero(np.sum([s["class_histogram"] for s in data["shards"]], axis=0)))
                      if data["shards"] else 0}
    parts = [{"path": p[len(root) + 1:] if p != root else ""} for p in parent.parts] + [{"path": rel}]
    for p in parts:
        purl = storage.join(root, p["path"]) if p["path"] else root
        pm = Manifest.load(purl)
        p.update(checksum=pm.checksum(), count=pm.count)
    new = cur + 1
    name = _version_name(new, rel)
    data.update(version=new, parent=cur, parent_manifest=cur_name, created=_now(), batch=rel, parts=parts, note=note,
                counts=add_counts(parent.counts, counts if counts is not None else record_counts(batch)))
    data.pop("pack_config", None)
    blob = (json.dumps(data, indent=1) + "\n").encode()
    try:
        pointers.write_pointer(_version_url(root, name), blob, expect=None)  # create-only: immutable
    except storage.PreconditionFailed:
        pass  # left by a crashed attempt at this same (version, batch): identical meaning, keep it
    try:
        pointers.write_pointer(_head_url(root), json.dumps({"version": new, "manifest": name,
                                                           "changed": _now()}).encode(), expect=token)
    except storage.PreconditionFailed:
        raise HeadMoved(f"{root}: head moved while publishing {rel}; re-validate against the new head") from None
    return _load(root, name)
