"""Scene datasets: road scenes packed into encoded shards with their boxes as per-record extras, and
streamed back as full images plus boxes under the exactly-once plan of the generic stream.

**Packing** (:func:`pack_scenes`): the generic packer (:mod:`signscale.data.pack`) does not yet write a
Sample's ``meta`` into the ``encoded`` encoding's per-record JSON extras, so scenes are packed here
with the same shard format, manifest and quarantine file (boxes in the extras); the manifest
records ``"scenes": true``. **Streaming** (:class:`SceneStream`): the generic stream decodes every
record to one square size and drops extras, so this subclass keeps the exactly-once epoch plan,
partition and resume of :class:`signscale.data.stream.ShardStream` and only replaces how a batch is
assembled: a list of full-resolution images plus their boxes, unchanged.

What a scene is and how one is read or drawn is the source's side (:mod:`signscale.data.sources.scenes`)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from signscale import images, storage
from signscale.data import shards
from signscale.data.manifest import Manifest, write_dataset_index
from signscale.data.sources.base import CONDITIONS, Problem, Sample, Source, SourceError
from signscale.data.sources.scenes import SCENE_KINDS, is_scene_spec, open_scene_source
from signscale.data.stream import ShardStream, StreamConfig
from signscale.labels import COUNTRIES


@dataclass(frozen=True)
class ScenePackConfig:
    source: str  # a scene source spec
    out: str
    shard_mb: float = 64.0
    image_format: str = "jpeg"  # jpeg | png | original (bytes as the source gives them)
    quality: int = 92
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    name: str = ""

    def __post_init__(self) -> None:
        if self.image_format not in ("jpeg", "png", "original"):
            raise ValueError(f"image_format: expected jpeg, png or original, got {self.image_format!r}")


@dataclass
class ScenePackResult:
    url: str
    count: int = 0
    boxes: int = 0
    shards: int = 0
    bytes: int = 0
    quarantined: int = 0
    box_problems: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        q = f", {self.quarantined} scene(s) quarantined" if self.quarantined else ""
        bp = (
            f", {self.box_problems} box problem(s) ({', '.join(f'{k}={v}' for k, v in sorted(self.by_reason.items()))})"
            if self.by_reason
            else ""
        )
        return (f"packed {self.count:,} scenes with {self.boxes:,} boxes into {self.shards} shard(s), "
                f"{self.bytes / 2**20:.1f} MiB at {self.url} in {self.seconds:.1f}s{q}{bp}")


def _encode(arr: np.ndarray, fmt: str, quality: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG" if fmt == "jpeg" else "PNG", quality=quality)
    return buf.getvalue()


def _scene_record(sample: Sample, index: int, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    rec = np.zeros((), dtype=dtype)
    rec["id"], rec["label"], rec["track"] = index, sample.label, shards.track_hash(sample.track)
    rec["roi"] = (-1, -1, -1, -1)
    rec["condition"] = CONDITIONS.index(sample.condition) if sample.condition in CONDITIONS else 0
    rec["country"] = COUNTRIES.index(sample.country) if sample.country in COUNTRIES else 0
    return rec


def _problem_reason(text: str) -> str:
    """'gt.txt:12: box_outside_image (...)' -> 'box_outside_image'."""
    tail = text.split(": ", 1)[-1] if ": " in text else text
    return tail.split(" ", 1)[0]


# Quarantine reasons that lose a whole scene; the others are single boxes a reader dropped.
_SCENE_LEVEL = {"missing_file", "unreadable_image", "not_an_image", "too_many_pixels", "truncated", "empty",
                "undecodable", "missing_label_file", "bad_array"}


class _ShardBuffer:
    """Scenes gathered until a shard's worth, then written as one ``encoded`` shard with its info."""

    def __init__(self, out: str, dtype: np.dtype, num_classes: int, budget: int) -> None:
        self.out, self.dtype, self.num_classes, self.budget = out, dtype, num_classes, budget
        self.infos: list[dict[str, Any]] = []
        self.recs: list[np.ndarray] = []
        self.blobs: list[bytes] = []
        self.extras: list[bytes] = []
        self.size = 0

    def add(self, rec: np.ndarray, blob: bytes, meta: dict[str, Any]) -> None:
        self.recs.append(rec)
        self.blobs.append(blob)
        self.extras.append(json.dumps(meta, separators=(",", ":")).encode())
        self.size += len(blob) + 200
        if self.size >= self.budget:
            self.flush()

    def flush(self) -> None:
        if not self.recs:
            return
        data = shards.encode_encoded_shard(np.array(self.recs, dtype=self.dtype), self.blobs, self.extras)
        path = f"shards/shard-{len(self.infos):05d}.sgs"
        sha = storage.write_bytes(storage.join(self.out, path), data)
        labels = np.array([x for e in self.extras for x in json.loads(e)["labels"]], dtype=np.int64)
        ch = np.bincount(labels, minlength=self.num_classes)[:self.num_classes]
        self.infos.append({"path": path, "sha256": sha, "bytes": len(data), "count": len(self.recs),
                           "class_histogram": [int(x) for x in ch]})
        self.recs.clear(), self.blobs.clear(), self.extras.clear()
        self.size = 0


def pack_scenes(cfg: ScenePackConfig, *, progress: Any = None) -> ScenePackResult:
    """Pack a scene source into ``encoded`` shards at ``cfg.out``; boxes go into each record's extras.

    Scenes that cannot be read are quarantined; boxes dropped by a reader (outside the image, zero area,
    class outside the catalogue) are listed in ``quarantine.jsonl`` with their file and line. The
    manifest is written last, after every shard.
    """
    started = time.perf_counter()
    source = open_scene_source(cfg.source) if is_scene_spec(cfg.source) else _raise_not_scene(cfg.source)
    out = cfg.out.rstrip("/")
    storage.makedirs(out)
    dtype = shards.record_dtype("encoded", None)
    result = ScenePackResult(url=out)
    quarantine: list[dict[str, Any]] = [{"index": -1, "key": p.key, "reason": p.reason, "detail": p.detail,
                                         "source": cfg.source} for p in getattr(source, "problems", [])]
    buffer = _ShardBuffer(out, dtype, len(source.label_space), cfg.shard_mb * 2**20)
    hist = np.zeros(len(source.label_space), np.int64)
    for i in range(len(source)):
        item = source.read(i)
        if progress is not None:
            progress(1)
        scene = _read_scene(item, i, cfg, quarantine)
        if scene is None:
            continue
        arr, meta, blob = scene
        buffer.add(_scene_record(item, i, arr, dtype), blob, meta)
        hist += np.bincount(np.asarray(meta["labels"], np.int64), minlength=len(hist))[:len(hist)]
        result.count += 1
        result.boxes += len(meta["labels"])
    buffer.flush()
    m = write_dataset_index(
        out, name=cfg.name or source.kind, source=source.describe(), encoding="encoded", record_dtype=dtype,
        label_space=source.label_space, shard_infos=buffer.infos, sources=[cfg.source], quarantine=quarantine,
        totals={"count": result.count, "boxes": result.boxes, "classes": int((hist > 0).sum())},
        extra={"scenes": True, "pack_config": {k: getattr(cfg, k) for k in ScenePackConfig.__dataclass_fields__}})
    result.shards, result.bytes = len(buffer.infos), m.data["totals"]["bytes"]
    result.quarantined = sum(1 for q in quarantine if q["reason"] in _SCENE_LEVEL)
    result.box_problems = len(quarantine) - result.quarantined
    result.by_reason = m.data["quarantine"]["by_reason"]
    result.seconds = time.perf_counter() - started
    return result


def _read_scene(item: Sample | Problem, i: int, cfg: ScenePackConfig, quarantine: list[dict[str, Any]]
                ) -> tuple[np.ndarray, dict[str, Any], bytes] | None:
    """(pixels, extras, stored bytes) of one scene, its dropped boxes quarantined; None (quarantined)
    when the scene itself cannot be used."""
    if isinstance(item, Problem):
        quarantine.append({"index": i, "key": item.key, "reason": item.reason, "detail": item.detail,
                           "source": cfg.source})
        return None
    try:
        arr = item.image if isinstance(item.image, np.ndarray) else images.decode(item.image or b"",
                                                                                   max_pixels=cfg.max_pixels)
        if arr.shape[0] * arr.shape[1] > cfg.max_pixels:
            raise images.ImageError("too_many_pixels", f"{arr.shape[1]}x{arr.shape[0]} > {cfg.max_pixels}")
    except images.ImageError as exc:
        quarantine.append({"index": i, "key": item.key, "reason": exc.reason, "detail": exc.detail,
                           "source": cfg.source})
        return None
    meta = dict(item.meta)
    for text in meta.get("problems", []):
        quarantine.append({"index": i, "key": item.key, "reason": _problem_reason(text), "detail": text,
                           "source": cfg.source})
    blob = item.image if (cfg.image_format == "original" and isinstance(item.image, bytes)) else \
        _encode(arr, "png" if cfg.image_format == "original" else cfg.image_format, cfg.quality)
    meta["key"] = item.key
    return arr, meta, blob


def _raise_not_scene(spec: str) -> Source:
    raise SourceError(f"{spec!r} is not a scene source; scene kinds: {', '.join(SCENE_KINDS)}")


def is_scene_dataset(url: str) -> bool:
    """True for a packed scene dataset (a manifest with ``"scenes": true``)."""
    try:
        m = Manifest.load(url)
    except (shards.ShardError, storage.StorageError, OSError, ValueError):
        return False
    return bool(m.data.get("scenes"))


def iter_scenes(url: str) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
    """(image, extras) of every record of a packed scene dataset in stored order (for evaluation)."""
    m = Manifest.load(url)
    for s in range(len(m.shards)):
        r = shards.ShardReader(m.shard_url(s))
        for blob, extra in zip(r.blobs(), r.extras()):
            yield images.decode(blob), extra


class SceneStream(ShardStream):
    """A ShardStream whose batches hold full-size scenes and their boxes (not square crops).

    A batch is ``{"images": [HxWx3 uint8 tensors], "targets": [{"boxes": float32 [N, 4],
    "labels": int64 [N]}], "keys": [scene key], "meta": ...}``; boxes come straight from the record's extras,
    so what was packed is what training sees (tested). ``id``/``pad``/``worker``/``batch`` work as in the parent,
    so resume and exact accounting are the parent's.
    """

    def __init__(self, cfg: StreamConfig, **kw: Any) -> None:
        if not cfg.image_size:  # the parent insists on a decode size for encoded data; scenes keep theirs
            from dataclasses import replace

            cfg = replace(cfg, image_size=1)
        super().__init__(cfg, **kw)
        for u, m in zip(cfg.datasets, self.manifests):
            if not m.data.get("scenes"):
                raise shards.ShardError(f"{u}: not a scene dataset; pack scenes with "
                                        "`signscale pack-scenes SOURCE OUT` (boxes go into the records' extras)")

    def _assemble(self, ds: np.ndarray, rec: np.ndarray, pad: np.ndarray, worker: int, j: int) -> dict[str, Any]:
        n = len(ds)
        imgs: list[torch.Tensor | None] = [None] * n
        targets: list[dict[str, torch.Tensor] | None] = [None] * n
        keys: list[str] = [""] * n  # the scene's source key (hard negatives are looked up by it)
        meta = np.zeros((n, 11), dtype=np.int64)
        skip = np.zeros(n, dtype=bool)  # rows in corrupt blocks (on_corrupt="skip"; "raise" raised)
        readers = self._dataset_readers()
        for d in np.unique(ds):
            sel = np.nonzero(ds == d)[0]
            reader = readers[int(d)]
            recs, blobs, bad = reader.take(rec[sel])
            if bad is not None:
                skip[sel] = bad
            shard_of = np.searchsorted(reader.m.starts, rec[sel], side="right") - 1
            for k, (i, b) in enumerate(zip(sel, blobs or [])):
                if skip[i]:
                    continue
                s = int(shard_of[k])
                local = int(rec[sel][k] - reader.m.starts[s])
                extra = reader.reader(s).extras(local, local + 1)[0]
                imgs[i] = torch.from_numpy(np.array(images.decode(b)))
                keys[i] = str(extra.get("key", ""))
                targets[i] = {"boxes": torch.tensor(extra.get("boxes", []), dtype=torch.float32).reshape(-1, 4),
                              "labels": torch.tensor(extra.get("labels", []), dtype=torch.int64)}
            for c, key in enumerate(("id", "label", "track", "condition", "country")):
                meta[sel, c] = recs[key]
        meta[:, 5] = ds
        meta[:, 6] = pad
        out = {"images": imgs, "targets": targets, "keys": keys, "meta": torch.from_numpy(meta), "worker": worker,
               "batch": j}
        if skip.any():
            keep = np.flatnonzero(~skip)
            out.update(images=[imgs[i] for i in keep], targets=[targets[i] for i in keep],
                       keys=[keys[i] for i in keep], meta=torch.from_numpy(meta[keep]), skipped=self.skipped(skip))
        return out
