"""``pack(PackConfig) -> PackResult``: a source into checksummed shards on any storage URL.

How the work is cut: source indices are split into fixed *chunks*, chunk ``c`` becomes shard
``c``. The cut depends only on the source and the config, never on the number of ranks or
workers, so a pack on 1 or N ranks gives the same shard set, a crashed pack keeps its finished
chunks, and each rank packs the chunks ``c % world_size == rank``.

Per chunk: decode and validate in worker processes -> write the shard atomically -> write a small
sidecar (counts, sha256, problems, content hashes). The sidecar is written after its shard, and
the manifest after every sidecar: the index is always written last. Finalising removes duplicate
content across chunks (first occurrence wins), then writes ``quarantine.jsonl`` and
``manifest.json``.

Crashes: a killed pack resumes from its finished chunks. Its decode workers do not outlive it
(:func:`_die_with_parent`), and the temp files its atomic writes leave behind (``.NAME.tmp-XXXXXXXX``,
see :func:`storage.temp_name`) are removed by the next pack into the same folder once they are
:data:`STALE_TMP_S` old (:func:`remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from signscale import config as config_mod
from signscale import images, storage
from signscale.data import permutation, shards
from signscale.data import world as process_group
from signscale.data.manifest import Manifest, write_dataset_index
from signscale.data.sources import CONDITIONS, Problem, Sample, Source, open_source
from signscale.labels import COUNTRIES

WORK_DIR = "_pack"

# A temp file untouched this long belongs to a dead writer: a live one writes its shard in one go,
# fsyncs and renames it within seconds (minutes for 64 MB on a slow shared disk), and another rank
# packing into the same folder is such a live writer. The shard cache in stream.py uses the same hour.
STALE_TMP_S = 3600.0
# How often a decode worker checks that its parent is alive where the kernel cannot tell it (non-Linux).
PARENT_POLL_S = 0.5


@dataclass(frozen=True)
class PackConfig:
    """What to pack, where, and how."""

    source: str
    out: str
    encoding: Literal["raw", "encoded"] = "raw"
    image_size: int = 32  # raw: images are resized to image_size x image_size
    crop: Literal["none", "roi"] = "none"  # raw: crop to the ROI (when known) before resizing
    shard_mb: float = 64.0
    workers: int = -1  # decode processes; -1 = one per CPU core, 0 = in this process
    name: str = ""  # dataset name; default: derived from the source
    strict: bool = False  # fail (non-zero exit) when anything is quarantined
    dedup: bool = True  # drop exact duplicate content (first occurrence wins)
    shuffle: bool = True  # store records in a seeded pseudo-random order (see source_order)
    shuffle_seed: int = 0
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    rank: int = -1  # -1: from torch.distributed / torchrun, else this rank of world_size
    world_size: int = -1
    progress: bool = True

    def __post_init__(self) -> None:
        if self.encoding not in ("raw", "encoded"):
            raise config_mod.ConfigError(f"encoding: expected raw or encoded, got {self.encoding!r}")
        if not 4 <= self.image_size <= 1024:
            raise config_mod.ConfigError(f"image_size: {self.image_size} is outside 4..1024")
        if self.shard_mb <= 0:
            raise config_mod.ConfigError("shard_mb: must be > 0")

    def fingerprint(self) -> str:
        """What determines the shard contents (not where or by how many processes)."""
        keys = ("source", "encoding", "image_size", "crop", "shard_mb", "max_pixels", "shuffle", "shuffle_seed")
        # "size" was image_size's name when packs began to be fingerprinted: kept, so they still resume
        blob = json.dumps({("size" if k == "image_size" else k): getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class PackResult:
    url: str
    count: int = 0
    shards: int = 0
    bytes: int = 0
    quarantined: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    finalized: bool = False
    checksum: str = ""
    chunks_done: int = 0
    chunks_reused: int = 0

    @property
    def images_per_s(self) -> float:
        return (self.count + self.quarantined) / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        if not self.finalized:
            return (f"packed {self.chunks_done} chunk(s) ({self.chunks_reused} reused) into {self.url}; "
                    "the manifest is written by the last rank to finish")
        q = f", {self.quarantined} quarantined ({', '.join(f'{k}={v}' for k, v in sorted(self.by_reason.items()))})" \
            if self.quarantined else ""
        return (f"packed {self.count:,} samples into {self.shards} shard(s), {self.bytes / 2**20:.1f} MiB at "
                f"{self.url} in {self.seconds:.1f}s ({self.images_per_s:,.0f} images/s){q}")


# ---------------------------------------------------------------------------------------------
# Per-sample work, run in worker processes

_WORKER: dict[str, Any] = {}


def _init_worker(source: Source, cfg: PackConfig, parent: int | None = None) -> None:
    if parent is not None:
        _die_with_parent(parent)
    _WORKER["source"] = source
    _WORKER["cfg"] = cfg
    _WORKER["dtype"] = shards.record_dtype(cfg.encoding, (cfg.image_size, cfg.image_size, 3))


def _die_with_parent(parent: int) -> None:
    """End this worker when the pack process ``parent`` dies, even by kill -9.

    A pool worker blocks on its task queue, and every worker holds that queue's write end too, so
    it never sees end-of-file: without this an orphaned worker (hundreds of MB with a source
    loaded) lives until someone finds it. The worker writes nothing, so it may die at any point.
    Linux: the kernel sends SIGKILL when the parent exits (prctl PR_SET_PDEATHSIG). Everywhere: a
    daemon thread polls ``os.getppid()``, which changes once the parent is gone (the forkserver
    start method's parent is the forkserver, which exits with the pack process).
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            # the process's own symbols include libc's prctl; 1 = PR_SET_PDEATHSIG
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    watched = os.getppid()
    if watched != parent and not _alive(parent):
        os._exit(1)  # the pack process died before this worker got here
    threading.Thread(target=_watch_parent, args=(watched,), name="watch-parent", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch_parent(watched: int) -> None:
    while os.getppid() == watched:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def remove_stale_temps(out: str, older_than_s: float = STALE_TMP_S) -> list[str]:
    """Remove temp files of killed writes in a local pack folder (the dataset folder, ``shards/``,
    ``_pack/``); returns their paths. Only those untouched for ``older_than_s``: a fresh one may be
    another rank's write in progress."""
    return [p for folder in (out, storage.join(out, "shards"), storage.join(out, WORK_DIR))
            for p in storage.remove_temps(folder, stale=storage.older_than(older_than_s))]


def _meta(rec: np.ndarray, s: Sample, index: int, roi: tuple[int, int, int, int] | None) -> None:
    rec["id"] = index
    rec["label"] = s.label
    rec["track"] = shards.track_hash(s.track)
    rec["roi"] = roi if roi is not None else (-1, -1, -1, -1)
    rec["condition"] = CONDITIONS.index(s.condition)
    rec["country"] = COUNTRIES.index(s.country)
    rec["source"] = 0


def _validate(s: Sample, source: Source) -> str | None:
    """Reason code if the sample's metadata is unusable."""
    if not 0 <= s.label < len(source.label_space):
        return "label_out_of_range"
    if s.condition not in CONDITIONS:
        return "unknown_condition"
    if s.country not in COUNTRIES:
        return "unknown_country"
    return None


def _to_array(s: Sample, max_pixels: int) -> np.ndarray:
    if isinstance(s.image, np.ndarray):
        if s.image.ndim != 3 or s.image.shape[2] != 3 or s.image.dtype != np.uint8:
            raise images.ImageError("bad_array", f"expected HxWx3 uint8, got {s.image.shape} {s.image.dtype}")
        if s.image.shape[0] * s.image.shape[1] > max_pixels:
            raise images.ImageError("too_many_pixels", f"{s.image.shape}")
        return s.image
    if s.image is None:
        raise images.ImageError("empty", "source returned no image")
    return images.decode(s.image, max_pixels=max_pixels)


def _process(item: Sample, index: int, cfg: PackConfig, source: Source, dtype: np.dtype
             ) -> tuple[np.ndarray, bytes | None, int]:
    """One good record (and its encoded bytes for the encoded encoding) plus its content hash."""
    arr = _to_array(item, cfg.max_pixels)
    h, w = arr.shape[:2]
    roi = item.roi
    rec = np.zeros((), dtype=dtype)
    blob: bytes | None = None
    if cfg.encoding == "raw":
        if cfg.crop == "roi" and roi is not None:
            arr = images.crop_box(arr, roi)
            ch, cw = arr.shape[:2]
            roi = (0, 0, cw, ch)
            h, w = ch, cw
        rec["image"] = images.resize(arr, cfg.image_size)
        if roi is not None:  # ROI in the coordinates of the stored image
            sx, sy = cfg.image_size / w, cfg.image_size / h
            roi = (round(roi[0] * sx), round(roi[1] * sy), round(roi[2] * sx), round(roi[3] * sy))
    else:
        blob = item.image if isinstance(item.image, bytes) else images.encode_png(arr)
    _meta(rec, item, index, roi)
    digest = shards.content_hash(item.image)  # type: ignore[arg-type]
    return rec, blob, digest


def _pack_range(start: int, stop: int) -> tuple[np.ndarray, list[bytes], list[dict[str, Any]], np.ndarray]:
    source: Source = _WORKER["source"]
    cfg: PackConfig = _WORKER["cfg"]
    dtype = _WORKER["dtype"]
    recs, blobs, problems, hashes = [], [], [], []
    for i in source_order(np.arange(start, stop), len(source), cfg):
        i = int(i)
        item = source.read(i)
        if isinstance(item, Problem):
            problems.append({"index": i, "key": item.key, "reason": item.reason, "detail": item.detail})
            continue
        reason = _validate(item, source)
        if reason:
            detail = f"label={item.label}, condition={item.condition!r}, country={item.country!r}"
            problems.append({"index": i, "key": item.key, "reason": reason, "detail": detail})
            continue
        try:
            rec, blob, digest = _process(item, i, cfg, source, dtype)
        except images.ImageError as exc:
            problems.append({"index": i, "key": item.key, "reason": exc.reason, "detail": exc.detail})
            continue
        recs.append(rec)
        hashes.append(digest)
        if blob is not None:
            blobs.append(blob)
    arr = np.array(recs, dtype=dtype) if recs else np.zeros(0, dtype=dtype)
    return arr, blobs, problems, np.array(hashes, dtype=np.uint64)


# ---------------------------------------------------------------------------------------------
# Chunks


def source_order(positions: np.ndarray, n: int, cfg: PackConfig) -> np.ndarray:
    """Source index stored at each dataset position.

    Sources are often sorted (GTSRB by class, then track), and the loader shuffles blocks of
    consecutive records for locality: packed in source order, a batch would hold a handful of
    classes. So pack stores records in a pseudo-random order, computed per position in O(1)
    memory by :mod:`signscale.data.permutation`.
    """
    positions = np.asarray(positions, dtype=np.uint64)
    if not cfg.shuffle or n <= 1:
        return positions.astype(np.int64)
    return permutation.permute(positions, n, cfg.shuffle_seed).astype(np.int64)


def records_per_shard(cfg: PackConfig, source: Source) -> int:
    """Records per chunk: from the fixed record size (raw) or the mean size of the first images."""
    if cfg.encoding == "raw":
        itemsize = shards.record_dtype("raw", (cfg.image_size, cfg.image_size, 3)).itemsize
        return max(1, int(cfg.shard_mb * 2**20 // itemsize))
    sizes = []
    for i in range(min(64, len(source))):
        item = source.read(i)
        if isinstance(item, Sample) and item.image is not None:
            sizes.append(len(item.image) if isinstance(item.image, bytes) else item.image.size // 3)
    mean = max(1.0, float(np.mean(sizes))) if sizes else 4096.0
    return max(1, int(cfg.shard_mb * 2**20 // (mean + 64)))


def _shard_path(c: int) -> str:
    return f"shards/shard-{c:05d}.sgs"


def _sidecar_url(out: str, c: int) -> str:
    return storage.join(out, WORK_DIR, f"chunk-{c:05d}.json")


def _write_shard(out: str, c: int, recs: np.ndarray, blobs: list[bytes], n_labels: int,
                 extras: list[bytes] | None = None) -> dict[str, Any]:
    raw = "image" in (recs.dtype.names or ())
    data = shards.encode_raw_shard(recs) if raw else shards.encode_encoded_shard(recs, blobs, extras)
    sha = storage.write_bytes(storage.join(out, _shard_path(c)), data)
    hist = np.bincount(recs["label"], minlength=n_labels)[:n_labels] if len(recs) else np.zeros(n_labels, int)
    return {"path": _shard_path(c), "sha256": sha, "bytes": len(data), "count": int(len(recs)),
            "class_histogram": [int(x) for x in hist]}


def _chunk_done(out: str, c: int, fingerprint: str, verify_hash: bool = True) -> dict[str, Any] | None:
    """The chunk's sidecar if it and its shard are complete and match this config.

    ``verify_hash`` re-hashes the shard (resuming a crashed pack); finalising after live ranks
    finished checks sizes only, so a pack to object storage does not download every shard again.
    """
    url = _sidecar_url(out, c)
    if not storage.exists(url):
        return None
    try:
        side = storage.read_json(url)
    except storage.StorageError:
        return None
    if side.get("fingerprint") != fingerprint:
        return None
    shard_url = storage.join(out, side["shard"]["path"])
    if not storage.exists(shard_url) or storage.size(shard_url) != side["shard"]["bytes"]:
        return None
    if verify_hash and storage.sha256_of(shard_url) != side["shard"]["sha256"]:
        return None
    return side


def _ranges(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, stop)) for a in range(start, stop, step)]


def _pack_chunk(c: int, bounds: tuple[int, int], cfg: PackConfig, out: str, source: Source,
                pool: ProcessPoolExecutor | None, fingerprint: str, advance: Any) -> dict[str, Any]:
    parts = _ranges(*bounds, 256)
    if pool is None:
        results = []
        for a, b in parts:
            results.append(_pack_range(a, b))
            advance(b - a)
    else:
        results = []
        for (a, b), r in zip(parts, pool.map(_pack_range, *zip(*parts))):
            results.append(r)
            advance(b - a)
    recs = np.concatenate([r[0] for r in results])
    blobs = [b for r in results for b in r[1]]
    problems = [p for r in results for p in r[2]]
    hashes = np.concatenate([r[3] for r in results]) if results else np.zeros(0, np.uint64)
    info = _write_shard(out, c, recs, blobs if cfg.encoding == "encoded" else [], len(source.label_space))
    side = {"fingerprint": fingerprint, "chunk": c, "bounds": list(bounds), "shard": info,
            "problems": problems, "hashes": shards.pack_uint64(hashes)}
    storage.write_json(_sidecar_url(out, c), side)
    return side


# ---------------------------------------------------------------------------------------------
# Finalising


def _dedup(sides: list[dict[str, Any]], out: str, source: Source, cfg: PackConfig) -> list[dict[str, Any]]:
    """Drop records whose content appeared earlier in the dataset; returns quarantine lines."""
    hashes = [shards.unpack_uint64(s["hashes"]) for s in sides]
    if not hashes:
        return []
    flat = np.concatenate(hashes)
    _, first = np.unique(flat, return_index=True)
    keep = np.zeros(len(flat), dtype=bool)
    keep[first] = True
    lines: list[dict[str, Any]] = []
    offset = 0
    for side, h in zip(sides, hashes):
        mask = keep[offset:offset + len(h)]
        offset += len(h)
        if mask.all():
            continue
        reader = shards.ShardReader(storage.join(out, side["shard"]["path"]))
        recs = np.array(reader.records())
        blobs = reader.blobs() if reader.encoding == "encoded" else []
        for rec in recs[~mask]:
            item = source.read(int(rec["id"]))
            key = item.key if isinstance(item, (Sample, Problem)) else str(rec["id"])
            lines.append({"index": int(rec["id"]), "key": key, "reason": "duplicate",
                          "detail": "same content as an earlier sample"})
        kept_blobs = [b for b, m in zip(blobs, mask) if m]
        side["shard"] = _write_shard(out, side["chunk"], recs[mask], kept_blobs, len(source.label_space))
        side["hashes"] = shards.pack_uint64(h[mask])
        storage.write_json(_sidecar_url(out, side["chunk"]), side)
    return lines


def _finalize(cfg: PackConfig, out: str, source: Source, sides: list[dict[str, Any]], rps: int,
              started: float) -> PackResult:
    dups = _dedup(sides, out, source, cfg) if cfg.dedup else []
    quarantine = [dict(p, source=cfg.source) for s in sides for p in s["problems"]]
    quarantine += [dict(d, source=cfg.source) for d in dups]
    quarantine.sort(key=lambda q: q["index"])
    for s in sides:
        if s["shard"]["count"] == 0:  # every record was bad or a duplicate: no shard to keep
            storage.delete(storage.join(out, s["shard"]["path"]))
    shard_infos = [s["shard"] for s in sides if s["shard"]["count"] > 0]
    total = sum(s["count"] for s in shard_infos)
    m = write_dataset_index(
        out,
        name=cfg.name or _default_name(cfg.source),
        source=source.describe(),
        encoding=cfg.encoding,
        record_dtype=shards.record_dtype(cfg.encoding, (cfg.image_size, cfg.image_size, 3)),
        label_space=source.label_space,
        shard_infos=shard_infos,
        sources=[cfg.source],
        quarantine=quarantine,
        image_shape=[cfg.image_size, cfg.image_size, 3] if cfg.encoding == "raw" else None,
        extra={
            "records_per_chunk": rps,
            "pack_config": {k: v for k, v in config_mod.to_dict(cfg).items() if k not in ("rank", "world_size")},
        },
    )
    q = m.data["quarantine"]
    return PackResult(url=out, count=total, shards=len(shard_infos), bytes=m.data["totals"]["bytes"],
                      quarantined=q["count"], by_reason=q["by_reason"], seconds=time.perf_counter() - started,
                      finalized=True, checksum=m.checksum())


def _default_name(spec: str) -> str:
    kind, _, rest = spec.partition(":")
    base = os.path.basename(rest.split("?")[0].rstrip("/")) or kind
    return base.split(".")[0] or kind


# ---------------------------------------------------------------------------------------------


def _rank_world(cfg: PackConfig) -> tuple[int, int]:
    if cfg.rank >= 0 and cfg.world_size >= 1:
        if cfg.rank >= cfg.world_size:
            raise config_mod.ConfigError(f"rank: {cfg.rank} must be < world_size {cfg.world_size}")
        return cfg.rank, cfg.world_size
    return process_group.rank(), process_group.world_size()


def pack(cfg: PackConfig) -> PackResult:
    """Pack ``cfg.source`` into shards at ``cfg.out``; resumes a crashed pack from its finished chunks."""
    started = time.perf_counter()
    from signscale.data.sources.scenes import is_scene_spec

    if is_scene_spec(cfg.source):  # scenes keep their boxes in per-record extras, which pack() does not write
        raise config_mod.ConfigError(f"source: {cfg.source!r} is a scene source (images with boxes); pack it with "
                                     "`signscale pack-scenes` so the boxes are kept")
    source = open_source(cfg.source)
    out = cfg.out.rstrip("/")
    storage.makedirs(out)
    remove_stale_temps(out)
    rank, world = _rank_world(cfg)
    rps = records_per_shard(cfg, source)
    n_chunks = math.ceil(len(source) / rps) if len(source) else 0
    fingerprint = cfg.fingerprint()
    mine = [c for c in range(n_chunks) if c % world == rank]
    workers = (os.cpu_count() or 1) if cfg.workers < 0 else cfg.workers
    result = PackResult(url=out)
    todo: list[int] = []
    sides: dict[int, dict[str, Any]] = {}
    for c in mine:
        side = _chunk_done(out, c, fingerprint)
        if side is not None:
            sides[c] = side
            result.chunks_reused += 1
        else:
            todo.append(c)
    total = sum(min(len(source), (c + 1) * rps) - c * rps for c in todo)
    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(source, cfg, os.getpid())) \
        if workers > 0 and todo else None
    if pool is None:
        _init_worker(source, cfg)
    from signscale.progress import progress_bar

    try:
        with progress_bar(f"pack rank {rank}" if world > 1 else "pack", total, enabled=cfg.progress) as advance:
            for c in todo:
                sides[c] = _pack_chunk(c, (c * rps, min(len(source), (c + 1) * rps)), cfg, out, source, pool,
                                       fingerprint, advance)
                result.chunks_done += 1
    finally:
        if pool is not None:
            pool.shutdown()
    process_group.barrier()
    if process_group.is_initialized() and process_group.rank() != 0:
        process_group.barrier()
        return _load_result(out, result, started)
    all_sides = [sides.get(c) or _chunk_done(out, c, fingerprint, verify_hash=False) for c in range(n_chunks)]
    if any(s is None for s in all_sides):
        result.seconds = time.perf_counter() - started
        return result  # other ranks still packing: the last one to finish writes the manifest
    final = _finalize(cfg, out, source, all_sides, rps, started)  # type: ignore[arg-type]
    final.chunks_done, final.chunks_reused = result.chunks_done, result.chunks_reused
    process_group.barrier()
    return final


def _load_result(out: str, partial: PackResult, started: float) -> PackResult:
    m = Manifest.load(out)
    q = m.data["quarantine"]
    return dataclasses.replace(partial, count=m.count, shards=len(m.shards), bytes=m.data["totals"]["bytes"],
                               quarantined=q["count"], by_reason=q["by_reason"], finalized=True,
                               checksum=m.checksum(), seconds=time.perf_counter() - started)
