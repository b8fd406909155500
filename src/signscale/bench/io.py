"""Benchmark commands: side-by-side figures and ratios from one run (DESIGN.md, habit 12).

``signscale bench io`` answers "what do shards buy us, and what does the loader cost?" on one source,
in one process tree, with every row measured the same way:

* **pack**: images/s of ``pack()`` for the ``raw`` and ``encoded`` encodings (local, and to S3);
* **read**: samples/s of uint8 NHWC batches at ``--image-size`` through a torch DataLoader, for
  - *plain files*: one file (one GET on S3) per sample, decoded and resized per sample by a
    map-style Dataset: what people do without shards;
  - *raw shards* and *encoded shards* read directly: ``ShardReader.records`` (and ``blobs``) over
    consecutive blocks of ``batch_size`` records, no epoch plan;
  - the *signscale loader* (``StreamLoader`` over the raw dataset), shuffled as in training and
    in order, so its own overhead and the cost of the shuffle can be told apart; each also with
    the shards' block sums unchecked (``StreamConfig.check_sums=False``), so the cost of
    integrity on read is a ratio of two rows of one run;
  - *litdata*, as a reference, when it is installed;
* **augment**: samples/s of training inputs (normalised float32 NCHW, augmented) from the raw
  shards, two ways: *per sample* -- a map-style Dataset applying torchvision v2 random affine, colour
  jitter and the flip rules to one image at a time, collated by the DataLoader (what a torchvision
  recipe does) -- and *per batch* -- the signscale loader slicing records with numpy and running
  :class:`~signscale.training.augment.BatchAugment` on each whole batch inside the workers, which hand
  8-bit pixels to the main process where :func:`~signscale.transforms.to_input` normalises them
  (what ``signscale train`` does on a CPU host). Besides wall-clock rates, these rows print samples
  per CPU-second, of this process and of the workers (once joined), which do not depend on the load.
  The batch path does strictly more work (it adds perspective, blur, weather and occluders), so the
  ratio understates its advantage.

Each read row is one epoch or ``max_seconds`` of it, whichever ends first; samples/s is over what was
read, counted from the moment the iterator is created (worker start-up included, as an epoch pays
it). Local rows run after one warm-up pass over every file, so they measure a warm page cache; the
S3 server (moto, in its own process) keeps objects in memory. Storage requests are counted by
wrapping :func:`signscale.storage.read_bytes` for the duration of the S3 rows (DataLoader workers are
forked, so they inherit the wrapper and share the counters).

``signscale bench synthetic`` renders synthetic signs on one core and prints signs/s.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from signscale import images, storage
from signscale.bench import report
from signscale.bench.readers import (
    PerSampleAugment,
    PlainFiles,
    RequestCounter,
    ShardBlocks,
    children_cpu,
    dataloader,
    loader_augment,
    mp_context,
    normalised,
)
from signscale.bench.report import (
    AUG_BATCH,
    AUG_SAMPLE,
    AUG_TORCH,
    AZURE,
    ENCODED,
    GCS,
    LITDATA,
    LOADER,
    LOADER_AGAIN,
    LOADER_AGAIN_UNCHECKED,
    LOADER_CACHED,
    LOADER_SEQ,
    LOADER_SEQ_UNCHECKED,
    LOADER_UNCHECKED,
    LOCAL,
    PACK_ENCODED,
    PACK_LITDATA,
    PACK_RAW,
    PLAIN,
    RAW,
    S3,
    UPLOAD_PLAIN,
    WRITE_PLAIN,
    Row,
    print_report,
)
from signscale.config import ConfigError

STORES = {"s3": S3, "gcs": GCS, "azure": AZURE}  # --stores name -> the "where" column

BUCKET = "bench"


@dataclass(frozen=True)
class BenchIOConfig:
    """What ``signscale bench io`` measures, on what."""

    source: str = "synthetic:?n=20000&size=32"
    image_size: int = 32  # images are decoded (and resized) to image_size x image_size x 3
    workers: tuple[int, ...] = (0, 2)  # DataLoader worker counts to try
    limit: int = 0  # use only the first N samples of the source (0: all)
    no_s3: bool = False  # skip every object-store row
    stores: tuple[str, ...] = ("s3",)  # object stores to measure on local emulators: s3, gcs, azure
    batch_size: int = 256
    workdir: str = ""  # where the benchmark data goes (kept); empty: a temp dir, removed afterwards
    max_seconds: float = 15.0  # time box of one read measurement
    # moto answers ~200 requests/s, so uploading 39k objects would take minutes; reads are time-boxed
    # anyway, so the plain-file S3 rows read (and extrapolate from) this many objects. 0: all.
    s3_plain_objects: int = 1000
    pack_workers: int = -1  # pack()'s decode processes (-1: one per core)
    shard_mb: float = 64.0  # pack()'s shard size (its default)
    litdata: bool = True  # add litdata rows when `import litdata` works
    augment: bool = True  # add the per-sample vs per-batch augmentation rows

    def __post_init__(self) -> None:
        if not 4 <= self.image_size <= 1024:
            raise ConfigError(f"image_size: {self.image_size} is outside 4..1024")
        unknown = [k for k in self.stores if k not in STORES]
        if unknown:
            raise ConfigError(f"stores: unknown store {unknown[0]!r}; expected a comma list of {', '.join(STORES)}")
        if not self.workers or any(w < 0 for w in self.workers):
            raise ConfigError(f"workers: expected a comma list of counts >= 0, e.g. 0,2; got {self.workers!r}")
        if self.limit < 0:
            raise ConfigError(f"limit: must be >= 0 (0: all samples), got {self.limit}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.max_seconds <= 0:
            raise ConfigError(f"max_seconds: must be > 0, got {self.max_seconds}")
        if self.shard_mb <= 0:
            raise ConfigError(f"shard_mb: must be > 0, got {self.shard_mb}")
        if self.s3_plain_objects < 0:
            raise ConfigError(f"s3_plain_objects: must be >= 0 (0: all), got {self.s3_plain_objects}")


@dataclass(frozen=True)
class BenchSyntheticConfig:
    """What ``signscale bench synthetic`` renders."""

    n: int = 5000
    image_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"n: must be >= 1, got {self.n}")
        if not 8 <= self.image_size <= 1024:
            raise ConfigError(f"image_size: {self.image_size} is outside 8..1024")


# ---------------------------------------------------------------------------------------------
# Readers: torch datasets for each way of reading


def augment_rows(raw_url: str, cfg: BenchIOConfig) -> list[Row]:
    """Per-sample (torchvision v2) vs per-batch (BatchAugment in the loader) training inputs, local."""
    from signscale.data.manifest import Manifest

    m = Manifest.load(raw_url)
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return [Row(AUG_SAMPLE, LOCAL, None, skipped=True, note="skipped: torchvision is not installed")]
    per_sample = PerSampleAugment(raw_url, cfg.image_size)
    threads = torch.get_num_threads()
    # One intra-op thread in this process too, as DataLoader workers have: the 0-worker rows then
    # measure one core, and tiny per-sample ops do not spin a thread pool on a loaded machine.
    torch.set_num_threads(1)
    try:
        rows = _augment_rows(raw_url, cfg, m, per_sample)
    finally:
        torch.set_num_threads(threads)
    return rows


def _augment_rows(raw_url: str, cfg: BenchIOConfig, m: Any, per_sample: PerSampleAugment) -> list[Row]:
    from signscale.data.stream import open_stream
    from signscale.training import augment

    def per_batch(w: int, compiled: bool | None) -> Iterable[dict[str, Any]]:
        loader = open_stream(raw_url, num_workers=w, batch_size=cfg.batch_size, shuffle=True)
        loader.stream.transform = loader_augment(cfg.image_size, m.label_space.flip_map(), compiled=compiled)
        return normalised(loader, cfg.image_size)

    batch_note = "numpy slicing + affine, perspective, colour, blur/weather/erase per batch, 8-bit to the main " \
                 "process, normalised there"
    rows: list[Row] = []
    for w in cfg.workers:
        makers = [(AUG_SAMPLE, lambda w=w: dataloader(per_sample, w, batch_size=cfg.batch_size, shuffle=True),
                   "affine + colour jitter + flip rules, one image at a time"),
                  (AUG_BATCH, lambda w=w: per_batch(w, None),
                   _join(batch_note, "compiled kernel" if augment.kernels is not None else "torch ops"))]
        if augment.kernels is not None:  # the same augmentation without the kernel, measured beside it
            makers.append((AUG_TORCH, lambda w=w: per_batch(w, False), _join(batch_note, "torch ops")))
        for what, make, note in makers:
            cpu0, kids0 = time.process_time(), children_cpu()
            row = _read_row(what, LOCAL, w, make, cfg=cfg, epoch=m.count, check=_check_input, note=note)
            cpu, kids = time.process_time() - cpu0, children_cpu() - kids0
            # CPU seconds do not depend on the load: the rate one core gives, in this process or per worker
            if w == 0 and cpu > 0:
                row.note = _join(row.note, f"{row.samples / cpu:,.0f} per CPU-second")
            if w > 0 and kids > 0:
                row.note = _join(row.note, f"{row.samples / kids:,.0f} per worker CPU-second, "
                                           f"main process {row.samples / max(cpu, 1e-9):,.0f} per CPU-second")
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class _Reads:
    samples: int
    seconds: float
    first_batch_s: float | None
    first_samples: int  # samples in the first batch
    complete: bool
    snaps: list[tuple[int, int, int]]  # (samples, requests, bytes) after each batch


def _check_uint8(img: torch.Tensor, size: int) -> None:
    if img.dtype != torch.uint8 or tuple(img.shape[1:]) != (size, size, 3):
        raise RuntimeError(f"reader yielded {tuple(img.shape)} {img.dtype}, expected (N, {size}, {size}, 3) uint8")


def _check_input(img: torch.Tensor, size: int) -> None:
    if img.dtype != torch.float32 or tuple(img.shape[1:]) != (3, size, size):
        raise RuntimeError(f"augmenting reader yielded {tuple(img.shape)} {img.dtype}, expected (N, 3, {size}, "
                           f"{size}) float32")


def _measure(make: Callable[[], Iterable[dict[str, Any]]], *, size: int, epoch: int, max_seconds: float,
             counter: RequestCounter | None = None,
             check: Callable[[torch.Tensor, int], None] = _check_uint8) -> _Reads:
    """Iterate batches for one epoch or ``max_seconds``; ``check`` validates each batch's images
    (default: uint8 (N, size, size, 3))."""
    snap = counter.snapshot if counter is not None else (lambda: (0, 0))
    t0 = time.perf_counter()
    it = iter(make())
    samples, first, first_samples = 0, None, 0
    snaps: list[tuple[int, int, int]] = []
    try:
        for batch in it:
            img = batch["image"]
            check(img, size)
            samples += int(img.shape[0])
            now = time.perf_counter()
            if first is None:
                first, first_samples = now - t0, samples
            snaps.append((samples, *snap()))
            if now - t0 >= max_seconds:
                break
        seconds = time.perf_counter() - t0
    finally:
        close = getattr(it, "close", None)
        if close is not None:  # StreamLoader's generator: shuts its DataLoader workers down
            close()
        del it
    return _Reads(samples, seconds, first, first_samples, samples >= epoch, snaps)


def _per_epoch(r: _Reads, epoch: int, k: int) -> float:
    """Counter ``k`` (1: requests, 2: bytes) for a whole epoch of ``epoch`` samples.

    A cut epoch is extrapolated at the rate of its second half: DataLoader workers run ahead of the
    consumer, and once their lead is steady it cancels out of the difference (it still adds a batch
    or two to the total, which is why such counts print with a '~').
    """
    end = r.snaps[-1]
    if r.complete:
        return float(end[k])
    mid = r.snaps[len(r.snaps) // 2]
    if end[0] > mid[0]:
        return end[k] + (end[k] - mid[k]) / (end[0] - mid[0]) * (epoch - end[0])
    return end[k] * epoch / max(1, end[0])


def _loader_row(what: str, where: str, workers: int, make: Callable[[], Iterable[dict[str, Any]]], *,
                cfg: BenchIOConfig, epoch: int, counter: RequestCounter | None) -> Row:
    """:func:`_read_row` plus samples per CPU-second of all processes (workers count once joined):
    on a shared machine the wall-clock rate moves with the load, the CPU cost per sample does not."""
    cpu0, kids0 = time.process_time(), children_cpu()
    row = _read_row(what, where, workers, make, cfg=cfg, epoch=epoch, counter=counter)
    cpu = time.process_time() - cpu0 + children_cpu() - kids0
    if cpu > 0:
        row.cpu_per_s = row.samples / cpu
        row.note = _join(row.note, f"{row.cpu_per_s:,.0f} per CPU-second (all processes)")
    return row


def _read_row(what: str, where: str, workers: int, make: Callable[[], Iterable[dict[str, Any]]], *,
              cfg: BenchIOConfig, epoch: int, counter: RequestCounter | None = None,
              subset_of: int = 0, note: str = "",
              check: Callable[[torch.Tensor, int], None] = _check_uint8) -> Row:
    """Measure one reader over an epoch of ``epoch`` samples; per-epoch counts are for a dataset of
    ``subset_of`` samples when the reader sees only the first ``epoch`` of them (linear: one GET each)."""
    if counter is not None:
        counter.reset()
    r = _measure(make, size=cfg.image_size, epoch=epoch, max_seconds=cfg.max_seconds, counter=counter, check=check)
    row = Row(what, where, workers, samples=r.samples, seconds=r.seconds, first_batch_s=r.first_batch_s, note=note)
    if r.first_batch_s is not None and r.samples > r.first_samples and r.seconds > r.first_batch_s:
        row.steady_per_s = (r.samples - r.first_samples) / (r.seconds - r.first_batch_s)
    full = subset_of or epoch
    row.partial = not r.complete or full != epoch
    if counter is not None and r.snaps and (workers == 0 or mp_context() == "fork"):
        row.requests = _per_epoch(r, epoch, 1) * full / epoch
        row.bytes = _per_epoch(r, epoch, 2) * full / epoch
    if not r.complete:
        row.note = _join(row.note, f"time-boxed at {cfg.max_seconds:g}s ({r.samples:,} of {epoch:,})")
    return row


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------
# Preparing the data: plain files, packed datasets

_PLAIN: dict[str, Any] = {}


def _init_plain(source: Any, folder: str) -> None:
    _PLAIN["source"], _PLAIN["folder"] = source, folder


def _plain_bytes(item: Any) -> tuple[bytes, str]:
    """The sample's original bytes and extension (PNG for sources that yield arrays)."""
    if isinstance(item.image, np.ndarray):
        return images.encode_png(item.image), ".png"
    ext = os.path.splitext(item.key)[1].lower()
    if ext not in (".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".pnm", ".bmp", ".gif", ".tif", ".tiff", ".webp"):
        fmt = images.open_checked(item.image).format or "bin"
        ext = "." + fmt.lower()
    return item.image, ext


def _write_plain_range(start: int, stop: int) -> list[dict[str, Any]]:
    from signscale.data.sources import Problem

    source, folder = _PLAIN["source"], _PLAIN["folder"]
    rows = []
    for i in range(start, stop):
        item = source.read(i)
        if isinstance(item, Problem) or item.image is None:
            continue
        data, ext = _plain_bytes(item)
        rel = f"{item.label:05d}/{i:06d}{ext}"
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        row = {"path": rel, "label": int(item.label), "condition": item.condition, "country": item.country}
        if item.track:
            row["track"] = item.track
        rows.append(row)
    return rows


def write_plain_files(source: Any, n: int, folder: str, *, workers: int) -> list[dict[str, Any]]:
    """The first ``n`` samples as one file each under ``folder/<label>/``, plus ``folder/list.jsonl``
    (a ``folder:`` source spec, so ``pack`` can read them)."""
    os.makedirs(folder, exist_ok=True)
    ranges = [(a, min(a + 512, n)) for a in range(0, n, 512)]
    if workers > 0 and len(ranges) > 1:
        with ProcessPoolExecutor(workers, initializer=_init_plain, initargs=(source, folder)) as pool:
            parts = list(pool.map(_write_plain_range, *zip(*ranges)))
    else:
        _init_plain(source, folder)
        parts = [_write_plain_range(a, b) for a, b in ranges]
    rows = [r for part in parts for r in part]
    with open(os.path.join(folder, "list.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def _warm(paths: Iterable[str]) -> None:
    """Read every file once so the local rows all see a warm page cache."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(8 << 20):
                pass


def _pack_row(spec: str, out: str, encoding: str, where: str, cfg: BenchIOConfig, note: str) -> tuple[Row, str]:
    from signscale.data.pack import PackConfig, pack

    res = pack(PackConfig(source=spec, out=out, encoding=encoding, image_size=cfg.image_size,  # type: ignore[arg-type]
                          workers=cfg.pack_workers, shard_mb=cfg.shard_mb, progress=False))
    workers = (os.cpu_count() or 1) if cfg.pack_workers < 0 else cfg.pack_workers
    q = f"{res.quarantined} quarantined" if res.quarantined else ""
    row = Row(PACK_RAW if encoding == "raw" else PACK_ENCODED, where, workers, kind="pack",
              samples=res.count + res.quarantined, seconds=res.seconds,
              note=_join(note, f"{res.shards} shard(s), {res.bytes / 2**20:.1f} MiB", q))
    return row, res.url


# ---------------------------------------------------------------------------------------------
# litdata (optional reference)


def _litdata_item(path: str, size: int = 32) -> dict[str, Any]:
    with open(path, "rb") as f:
        img = images.resize(images.decode(f.read()), size)
    label = int(os.path.basename(os.path.dirname(path)))
    return {"image": img, "label": label}


class _LitdataPrepare:
    """Picklable ``fn`` for ``litdata.optimize``: one plain file -> decoded, resized sample."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, path: str) -> dict[str, Any]:
        return _litdata_item(path, self.size)


def _litdata_rows(paths: list[str], out: str, cfg: BenchIOConfig) -> list[Row]:
    """litdata's optimize + StreamingDataset/StreamingDataLoader over the same samples (local only)."""
    import litdata

    workers = (os.cpu_count() or 1) if cfg.pack_workers < 0 else max(1, cfg.pack_workers)
    t0 = time.perf_counter()
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        litdata.optimize(fn=_LitdataPrepare(cfg.image_size), inputs=paths, output_dir=out, chunk_bytes="64MB",
                         num_workers=workers, mode="overwrite")
    rows = [Row(PACK_LITDATA, LOCAL, workers, kind="pack", samples=len(paths), seconds=time.perf_counter() - t0,
                note="decode + resize to raw arrays, like pack raw")]
    _warm(os.path.join(out, f) for f in os.listdir(out))
    for w in cfg.workers:
        def make(w: int = w) -> Iterable[dict[str, Any]]:
            ds = litdata.StreamingDataset(out, shuffle=False)
            return litdata.StreamingDataLoader(ds, batch_size=cfg.batch_size, num_workers=w)
        rows.append(_read_row(LITDATA, LOCAL, w, make, cfg=cfg, epoch=len(paths)))
    return rows


# ---------------------------------------------------------------------------------------------
# The benchmark


def _read_rows(where: str, *, plain: PlainFiles, plain_full: int, raw_url: str, enc_url: str, cfg: BenchIOConfig,
               counter: RequestCounter | None, plain_note: str = "") -> list[Row]:
    from signscale.data.manifest import Manifest
    from signscale.data.stream import open_stream

    raw_m, enc_m = Manifest.load(raw_url), Manifest.load(enc_url)
    raw = ShardBlocks([raw_m.shard_url(i) for i in range(len(raw_m.shards))], [s.count for s in raw_m.shards],
                      cfg.batch_size, cfg.image_size)
    enc = ShardBlocks([enc_m.shard_url(i) for i in range(len(enc_m.shards))], [s.count for s in enc_m.shards],
                      cfg.batch_size, cfg.image_size)
    rows: list[Row] = []
    for w in cfg.workers:
        rows.append(_read_row(PLAIN, where, w, lambda w=w: dataloader(plain, w, batch_size=cfg.batch_size,
                                                                        shuffle=True),
                              cfg=cfg, epoch=len(plain), counter=counter, subset_of=plain_full, note=plain_note))
        rows.append(_read_row(RAW, where, w, lambda w=w: dataloader(raw, w, batch_size=None),
                              cfg=cfg, epoch=raw_m.count, counter=counter))
        rows.append(_read_row(ENCODED, where, w, lambda w=w: dataloader(enc, w, batch_size=None),
                              cfg=cfg, epoch=enc_m.count, counter=counter))
        # each loader row with the block sums checked (the default) and, right after it, without:
        # what integrity on read costs (#19). A mapped shard's block is checked once per run, so a
        # second epoch (local rows) shows the steady state; remote reads are checked on every fetch.
        loaders: list[tuple[str, bool, bool, bool]] = [
            (LOADER, True, True, False), (LOADER_UNCHECKED, True, False, False),
            (LOADER_SEQ, False, True, False), (LOADER_SEQ_UNCHECKED, False, False, False)]
        if where == LOCAL:
            loaders += [(LOADER_AGAIN, True, True, True), (LOADER_AGAIN_UNCHECKED, True, False, True)]
        for shuffle in (True, False):  # one-time costs (imports, compiled shuffle) are no row's: one batch each
            next(iter(open_stream(raw_url, num_workers=0, batch_size=cfg.batch_size, shuffle=shuffle,
                                  check_sums=False)))
        for what, shuffle, check, again in loaders:
            def make(w: int = w, shuffle: bool = shuffle, check: bool = check) -> Iterable[dict[str, Any]]:
                return open_stream(raw_url, num_workers=w, batch_size=cfg.batch_size, shuffle=shuffle,
                                   check_sums=check)
            if again:  # the first epoch runs before the measurement starts
                first = make()
                for _ in first:
                    pass

                def make(first: Iterable[dict[str, Any]] = first) -> Iterable[dict[str, Any]]:
                    return first
            rows.append(_loader_row(what, where, w, make, cfg=cfg, epoch=raw_m.count, counter=counter))
        if where != LOCAL:  # whole shards downloaded once into a local cache, then memory-mapped
            def cached(w: int = w) -> Iterable[dict[str, Any]]:
                return open_stream(raw_url, num_workers=w, batch_size=cfg.batch_size,
                                   cache_dir=tempfile.mkdtemp(prefix="signscale-cache-"))
            rows.append(_read_row(LOADER_CACHED, where, w, cached, cfg=cfg, epoch=raw_m.count, counter=counter,
                                  note="first epoch, download included"))
    return rows


def bench_io(cfg: BenchIOConfig, *, console: Console | None = None) -> list[Row]:
    """Pack and read throughput, plain files vs shards vs the loader, local vs S3; prints a table and ratios."""
    from signscale.data.sources import open_source

    con = console or report.console_for_tables()
    started = time.perf_counter()
    say = lambda msg: con.print(f"[dim]{time.perf_counter() - started:6.1f}s  {msg}[/]")
    source = open_source(cfg.source)
    n = min(len(source), cfg.limit) if cfg.limit else len(source)
    work = cfg.workdir or tempfile.mkdtemp(prefix="signscale-bench-")
    rows: list[Row] = []
    try:
        cores = os.cpu_count() or 1
        plain_dir = os.path.join(os.path.abspath(work), "plain")
        say(f"writing {n:,} samples of {cfg.source} as plain files under {plain_dir} ...")
        t0 = time.perf_counter()
        listing = write_plain_files(source, n, plain_dir, workers=cores)
        rows.append(Row(WRITE_PLAIN, LOCAL, cores, kind="setup", samples=len(listing),
                        seconds=time.perf_counter() - t0, note="read source, write one file per sample"))
        paths = [os.path.join(plain_dir, r["path"]) for r in listing]
        labels = [r["label"] for r in listing]

        # pack reads the source itself when it can, so the pack rows are what `signscale pack` does;
        # a cut source (--limit) or a synthetic one (whose render cost `bench synthetic` measures) is
        # packed from the plain files instead.
        if n < len(source) or getattr(source, "kind", "") == "synthetic":
            spec, pack_note = f"folder:{plain_dir}/list.jsonl", "from the plain files"
        else:
            spec, pack_note = cfg.source, "from the source"
        local: dict[str, str] = {}
        for enc in ("raw", "encoded"):
            say(f"pack {enc} ({pack_note}) ...")
            row, local[enc] = _pack_row(spec, os.path.join(os.path.abspath(work), enc), enc, LOCAL, cfg, pack_note)
            rows.append(row)

        say("warm-up: reading every file once ...")
        _warm(paths)
        _warm(os.path.join(local[e], "shards", f) for e in local for f in os.listdir(os.path.join(local[e], "shards")))
        say("local reads ...")
        rows += _read_rows(LOCAL, plain=PlainFiles(paths, labels, cfg.image_size, remote=False), plain_full=len(paths),
                           raw_url=local["raw"], enc_url=local["encoded"], cfg=cfg, counter=None)
        if cfg.augment:
            say("augmentation: per sample (torchvision v2) vs per batch (BatchAugment in the loader) ...")
            rows += augment_rows(local["raw"], cfg)
        rows += _litdata(paths, os.path.join(os.path.abspath(work), "litdata"), cfg, say)
        if cfg.no_s3:
            rows.append(Row("object-store rows", S3, None, skipped=True, note="skipped: --no-s3"))
        for store in ([] if cfg.no_s3 else cfg.stores):
            rows += _store_rows(store, spec, pack_note, paths, labels, plain_dir, cfg, say)
    finally:
        if not cfg.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print_report(rows, con, title=f"bench io: {cfg.source}" + (f" (first {n:,})" if n < len(source) else "")
                 + f", {cfg.image_size}x{cfg.image_size}, batch {cfg.batch_size}, {os.cpu_count()} cores")
    return rows


def _litdata(paths: list[str], out: str, cfg: BenchIOConfig, say: Callable[[str], None]) -> list[Row]:
    if not cfg.litdata:
        return []
    try:
        import litdata  # noqa: F401
    except ImportError:
        return [Row(LITDATA, LOCAL, None, skipped=True, note="skipped: litdata is not installed (pip install litdata)")]
    say("litdata optimize + reads ...")
    try:
        return _litdata_rows(paths, out, cfg)
    except Exception as exc:  # noqa: BLE001 - a reference row must not sink the benchmark
        return [Row(LITDATA, LOCAL, None, skipped=True, note=f"skipped: litdata failed ({type(exc).__name__}: {exc})")]


def _store_rows(kind: str, spec: str, pack_note: str, paths: list[str], labels: list[int], plain_dir: str,
                cfg: BenchIOConfig, say: Callable[[str], None]) -> list[Row]:
    """The pack and read rows against one object store's emulator (moto, gcp-storage-emulator, Azurite)."""
    from signscale.testing import emulators

    where = STORES[kind]
    say(f"starting the local {where} emulator ...")
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(emulators.running(kind))
        except (emulators.EmulatorUnavailable, RuntimeError, ImportError) as exc:  # say so in the table
            return [Row(f"{where} rows", where, None, skipped=True, note=f"skipped: {exc}")]
        bucket = server.make_bucket(BUCKET)
        fs, _ = storage.filesystem(bucket)
        k = len(paths) if not cfg.s3_plain_objects else min(len(paths), cfg.s3_plain_objects)
        rel = [os.path.relpath(p, plain_dir) for p in paths[:k]]
        say(f"uploading {k:,} plain files (one object each) ...")
        t0 = time.perf_counter()
        root = bucket.split("://", 1)[1]
        fs.put(paths[:k], [f"{root}/plain/{r}" for r in rel])
        rows.append(Row(UPLOAD_PLAIN, where, None, kind="setup", samples=k, seconds=time.perf_counter() - t0,
                        requests=k, note="fsspec put, concurrent" + (f"; first {k:,} of {len(paths):,}"
                                                                      if k < len(paths) else "")))
        remote: dict[str, str] = {}
        for enc in ("raw", "encoded"):
            say(f"pack {enc} to {where} ...")
            row, remote[enc] = _pack_row(spec, f"{bucket}/{enc}", enc, where, cfg, pack_note)
            rows.append(row)
        plain = PlainFiles([f"{bucket}/plain/{r}" for r in rel], labels[:k], cfg.image_size, remote=True)
        note = f"{k:,} of {len(paths):,} objects uploaded" if k < len(paths) else ""
        say(f"{where} reads ...")
        counter = RequestCounter()
        with counter.installed():
            rows += _read_rows(where, plain=plain, plain_full=len(paths), raw_url=remote["raw"],
                               enc_url=remote["encoded"], cfg=cfg, counter=counter, plain_note=note)
    return rows


def bench_synthetic(cfg: BenchSyntheticConfig, *, console: Console | None = None) -> list[Row]:
    """Render ``cfg.n`` synthetic signs in this process (one core) and print signs/s."""
    from signscale.data.sources import open_source

    con = console or report.console_for_tables()
    source = open_source(f"synthetic:?n={cfg.n}&size={cfg.image_size}&seed={cfg.seed}")
    source.read(0)  # draws the class templates once, as every worker does at its start
    t0 = time.perf_counter()
    for i in range(cfg.n):
        source.read(i)
    row = Row("synthetic render", LOCAL, 0, kind="setup", samples=cfg.n, seconds=time.perf_counter() - t0,
              note="one core, no workers")
    table = Table(title=f"bench synthetic: {cfg.n:,} signs at {cfg.image_size}x{cfg.image_size}")
    for col in ("what", "signs", "seconds", "signs/s"):
        table.add_column(col, justify="left" if col == "what" else "right")
    table.add_row(row.what, f"{row.samples:,}", f"{row.seconds:.2f}", f"{row.samples_per_s:,.0f}")
    con.print(table)
    con.print(
        f"rendered {cfg.n:,} synthetic signs at {cfg.image_size}x{cfg.image_size} in {row.seconds:.1f}s on one core "
        f"({row.samples_per_s:,.0f} signs/s)"
    )
    return [row]


# ---------------------------------------------------------------------------------------------
# Report


# ---------------------------------------------------------------------------------------------


def parse_workers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"workers: expected a comma list of integers, e.g. 0,2; got {text!r}") from None


