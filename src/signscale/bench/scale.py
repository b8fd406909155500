"""``signscale bench scale``: does the cost per image stay flat as the dataset grows 40x?

For each size (default 50k, 500k, 2M records) the benchmark

1. **packs** that many records with the real :func:`signscale.data.pack.pack` on one core (``pack_workers``)
   and reports the cost per image. The records are *cheap generated* 32x32 images (a random tile
   with the record index stamped into one pixel, so no two are duplicates), not rendered signs:
   rendering runs at ~1-2k signs/s per core (``signscale bench synthetic``) and would turn a
   2M-record run into half an hour, while everything pack does after the source (validation,
   resize, hashing, shard encoding, checksums, sidecars, dedup, manifest) is the same code;
2. **streams** one shuffled epoch with the training loader (``StreamLoader``, ``workers`` processes)
   from the local, memory-mapped shards: samples/s, time to the first batch, and the peak memory
   of every loader worker, read by the worker itself from ``/proc/self`` while it works;
3. **streams** the same epoch through the object-store code path: the shards are addressed by a
   ``scalefs://`` URL, an fsspec filesystem over the same local files that signscale does not treat
   as local, so the loader uses ranged reads exactly as on ``s3://`` (no network latency). Every
   call to :func:`signscale.storage.read_bytes` is counted: storage requests per epoch.

The table puts the sizes side by side with the largest/smallest ratio of each figure. Flat cost
means ratios near 1.00x for per-image pack cost, samples/s and worker memory, and requests per
epoch growing with the record count only (a fixed number of records per request).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from signscale.config import ConfigError
from signscale.data.sources.base import Problem, Sample, Source
from signscale.labels import LabelSpace

NOISE_KIND = "scale-noise"
SCALEFS = "scalefs"


def parse_count(text: str, *, name: str = "sizes") -> int:
    """``50k`` -> 50_000, ``2m`` -> 2_000_000, ``1.5M`` -> 1_500_000, ``300`` -> 300."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMbBgG]?)\s*", text)
    if not m:
        raise ConfigError(f"{name}: {text!r} is not a count; write e.g. 50k, 500k, 2m or 1200")
    mult = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[m.group(2).lower()]
    value = round(float(m.group(1)) * mult)
    if value < 1:
        raise ConfigError(f"{name}: {text!r} must be at least 1")
    return value


def parse_sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(parse_count(t) for t in text.split(",") if t.strip())
    if not sizes:
        raise ConfigError("sizes: give a comma list, e.g. 50k,500k,2m")
    return sizes


def human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            v = n / div
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n:.0f}"


@dataclass(frozen=True)
class BenchScaleConfig:
    """What ``signscale bench scale`` measures."""

    sizes: tuple[int, ...] = (50_000, 500_000, 2_000_000)
    image_size: int = 32
    workers: int = 2  # loader worker processes
    batch_size: int = 256
    shard_mb: float = 64.0
    pack_workers: int = 0  # pack()'s decode processes (0: in this process, so the cost is per core)
    remote: bool = True  # also stream over the object-store code path and count its requests
    workdir: str = ""  # where the datasets go (kept); empty: a temp dir, each size removed after use

    def __post_init__(self) -> None:
        if not self.sizes or any(n < 1 for n in self.sizes):
            raise ConfigError(f"sizes: expected counts >= 1, got {self.sizes}")
        if not 4 <= self.image_size <= 256:
            raise ConfigError(f"image_size: {self.image_size} is outside 4..256")
        if self.workers < 0 or self.pack_workers < 0:
            raise ConfigError("workers, pack_workers: must be >= 0")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.shard_mb <= 0:
            raise ConfigError(f"shard_mb: must be > 0, got {self.shard_mb}")


# ---------------------------------------------------------------------------------------------
# Cheap records


class NoiseSource(Source):
    """``n`` cheap, distinct size x size RGB records: a seeded random tile with the index stamped in.

    Generating one costs a 3 KB copy, so a benchmark of pack measures pack, not the renderer.
    """

    kind = NOISE_KIND
    TILES = 256

    def __init__(self, n: int, size: int = 32, seed: int = 0, spec: str = "") -> None:
        super().__init__(LabelSpace.for_country("de"), spec)
        self.n, self.size, self.seed = n, size, seed
        self._tiles: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n

    def _tile(self, i: int) -> np.ndarray:
        if self._tiles is None:  # drawn lazily, in whichever process reads
            rng = np.random.default_rng(self.seed)
            self._tiles = rng.integers(0, 256, (self.TILES, self.size, self.size, 3), dtype=np.uint8)
        return self._tiles[i % self.TILES]

    def read(self, index: int) -> Sample | Problem:
        img = self._tile(index).copy()
        img[0, 0] = (index & 255, (index >> 8) & 255, (index >> 16) & 255)  # distinct content: no dedup hits
        img[0, 1, 0] = (index >> 24) & 255
        return Sample(key=f"{index:09d}", label=index % len(self.label_space), image=img)


def open_noise(location: str, spec: str = "", n: str = "1000", size: str = "32", seed: str = "0") -> NoiseSource:
    return NoiseSource(int(n), int(size), int(seed), spec=spec)


@contextlib.contextmanager
def noise_source_registered() -> Iterator[str]:
    """Make ``scale-noise:?n=N&size=S`` openable by :func:`signscale.data.sources.open_source` for a while.

    pack() opens its source from a spec string, so the benchmark's cheap source joins the table of
    source kinds for the duration of the run (and leaves it as it found it).
    """
    from signscale.data import sources

    had = sources.SOURCES.get(NOISE_KIND)
    sources.SOURCES[NOISE_KIND] = sources.SourceKind("signscale.bench.scale", "open_noise",
                                                     "cheap distinct records for scale benchmarks",
                                                     f"{NOISE_KIND}:?n=1000&size=32")
    try:
        yield NOISE_KIND
    finally:
        if had is None:
            sources.SOURCES.pop(NOISE_KIND, None)
        else:
            sources.SOURCES[NOISE_KIND] = had


def _register_scalefs() -> None:
    """``scalefs:///path``: local files that signscale treats as remote (ranged reads, counted)."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    class ScaleFS(LocalFileSystem):
        protocol = (SCALEFS,)

        @classmethod
        def _strip_protocol(cls, path: Any) -> str:
            path = str(path)
            if path.startswith(f"{SCALEFS}://"):
                path = path[len(SCALEFS) + 3:]
            return super()._strip_protocol(path)

    fsspec.register_implementation(SCALEFS, ScaleFS, clobber=True)


# ---------------------------------------------------------------------------------------------
# Measuring one epoch


def _proc_kib(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = out.get(k, 0) + int(v.split()[0])
    except OSError:
        pass
    return out


class MemoryProbe:
    """Batch transform run inside each loader worker: every ``every``-th batch it reads the worker's
    peak RSS (``VmHWM``) and its private dirty memory (pages this worker wrote: heap, buffers, the
    epoch plan; not the page cache of memory-mapped shards, not what it shares with the parent).
    """

    def __init__(self, every: int = 8) -> None:
        self.every = every
        self._n = 0

    def __call__(self, b: dict[str, Any]) -> dict[str, Any]:
        if self._n % self.every == 0 or b.get("batch", 0) == 0:
            st = _proc_kib("/proc/self/status", ("VmHWM",))
            sm = _proc_kib("/proc/self/smaps_rollup", ("Private_Dirty",))
            b["probe"] = (os.getpid(), st.get("VmHWM", 0), sm.get("Private_Dirty", 0))
        self._n += 1
        return b


@dataclass
class EpochFigures:
    samples: int = 0
    seconds: float = 0.0
    first_batch_s: float = 0.0
    worker_peak_rss_mib: float = 0.0  # max over workers of VmHWM
    worker_private_mib: float = 0.0  # max over workers and samples of Private_Dirty
    requests: int | None = None
    bytes: int | None = None

    first_samples: int = 0  # samples in the first batch

    @property
    def per_s(self) -> float:
        """Over the whole epoch, worker start-up and planning included (what an epoch pays)."""
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_per_s(self) -> float:
        """After the first batch: the rate once the workers run."""
        dt = self.seconds - self.first_batch_s
        return (self.samples - self.first_samples) / dt if dt > 0 else 0.0


def stream_epoch(url: str, cfg: BenchScaleConfig, counter: Any = None) -> EpochFigures:
    """One shuffled epoch through the training loader, with the memory probe in every worker."""
    from signscale.data.stream import open_stream

    loader = open_stream(url, num_workers=cfg.workers, batch_size=cfg.batch_size, shuffle=True)
    loader.stream.transform = MemoryProbe()
    fig = EpochFigures()
    peak: dict[int, int] = {}
    private: dict[int, int] = {}
    if counter is not None:
        counter.reset()
    t0 = time.perf_counter()
    for b in loader:
        if fig.samples == 0:
            fig.first_batch_s = time.perf_counter() - t0
            fig.first_samples = int(b["image"].shape[0])
        fig.samples += int(b["image"].shape[0])
        if "probe" in b:
            pid, hwm, priv = b["probe"]
            peak[pid] = max(peak.get(pid, 0), hwm)
            private[pid] = max(private.get(pid, 0), priv)
    fig.seconds = time.perf_counter() - t0
    fig.worker_peak_rss_mib = max(peak.values(), default=0) / 1024
    fig.worker_private_mib = max(private.values(), default=0) / 1024
    if counter is not None:
        fig.requests, fig.bytes = counter.snapshot()
    return fig


# ---------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class ScaleRow:
    """Figures for one dataset size."""

    records: int
    shards: int = 0
    dataset_mib: float = 0.0
    pack_seconds: float = 0.0
    # CPU time of the pack (in-process packs only): unlike wall time, it does not depend on how much of a
    # core other jobs left us, so it is the per-image cost to compare across sizes on a shared machine
    pack_cpu_seconds: float | None = None
    local: EpochFigures = field(default_factory=EpochFigures)
    remote: EpochFigures | None = None

    @property
    def pack_us_per_image(self) -> float:
        return self.pack_seconds / self.records * 1e6

    @property
    def pack_cpu_us_per_image(self) -> float | None:
        return None if self.pack_cpu_seconds is None else self.pack_cpu_seconds / self.records * 1e6

    def requests_per_1k(self) -> float | None:
        if self.remote is None or self.remote.requests is None:
            return None
        return self.remote.requests / self.records * 1000


def measure_size(n: int, cfg: BenchScaleConfig, root: str, counter: Any, say: Callable[[str], None]) -> ScaleRow:
    from signscale.data.pack import PackConfig, pack

    out = os.path.join(root, f"n{n}")
    say(f"{human(n)}: packing {n:,} cheap {cfg.image_size}x{cfg.image_size} records "
        f"({'one core' if cfg.pack_workers == 0 else f'{cfg.pack_workers} processes'}) ...")
    cpu0 = time.process_time()
    res = pack(PackConfig(source=f"{NOISE_KIND}:?n={n}&size={cfg.image_size}", out=out, image_size=cfg.image_size,
                          shard_mb=cfg.shard_mb, workers=cfg.pack_workers, progress=False))
    cpu = time.process_time() - cpu0
    if res.count != n:
        raise RuntimeError(f"pack kept {res.count:,} of {n:,} records ({res.by_reason}); the benchmark expects all")
    row = ScaleRow(records=n, shards=res.shards, dataset_mib=res.bytes / 2**20, pack_seconds=res.seconds,
                   pack_cpu_seconds=cpu if cfg.pack_workers == 0 else None)
    say(f"{human(n)}: streaming one epoch from local shards ({cfg.workers} workers) ...")
    row.local = stream_epoch(out, cfg)
    if cfg.remote:
        say(f"{human(n)}: streaming one epoch over ranged reads ({SCALEFS}://, counted) ...")
        with counter.installed():
            row.remote = stream_epoch(f"{SCALEFS}://{os.path.abspath(out)}", cfg, counter)
    return row


def bench_scale(cfg: BenchScaleConfig, *, console: Console | None = None) -> list[ScaleRow]:
    """Pack and stream each size in ``cfg.sizes``; print the side-by-side table and ratios."""
    from signscale.bench.readers import RequestCounter

    con = console or Console(highlight=False, width=200)
    started = time.perf_counter()
    say = lambda msg: con.print(f"[dim]{time.perf_counter() - started:6.1f}s  {msg}[/]")
    root = cfg.workdir or tempfile.mkdtemp(prefix="signscale-scale-")
    os.makedirs(root, exist_ok=True)
    _register_scalefs()
    counter = RequestCounter()
    rows: list[ScaleRow] = []
    try:
        with noise_source_registered():
            for n in cfg.sizes:
                rows.append(measure_size(n, cfg, root, counter, say))
                if not cfg.workdir:
                    shutil.rmtree(os.path.join(root, f"n{n}"), ignore_errors=True)
    finally:
        if not cfg.workdir:
            shutil.rmtree(root, ignore_errors=True)
    print_scale(rows, cfg, con)
    return rows


# ---------------------------------------------------------------------------------------------
# Report


def figures(rows: list[ScaleRow]) -> list[tuple[str, list[float | None], str]]:
    """(label, value per size, format) for each line of the table."""
    def remote(f: Callable[[EpochFigures], float | None]) -> list[float | None]:
        return [f(r.remote) if r.remote is not None else None for r in rows]

    return [
        ("shards", [float(r.shards) for r in rows], "{:,.0f}"),
        ("dataset MiB", [r.dataset_mib for r in rows], "{:,.0f}"),
        ("pack us/image", [r.pack_us_per_image for r in rows], "{:,.1f}"),
        ("pack CPU us/image", [r.pack_cpu_us_per_image for r in rows], "{:,.1f}"),
        ("stream samples/s (local mmap)", [r.local.per_s for r in rows], "{:,.0f}"),
        ("  after the first batch", [r.local.steady_per_s for r in rows], "{:,.0f}"),
        ("time to first batch s (local)", [r.local.first_batch_s for r in rows], "{:.3f}"),
        ("worker peak RSS MiB (local)", [r.local.worker_peak_rss_mib for r in rows], "{:,.0f}"),
        ("worker private MiB (local)", [r.local.worker_private_mib for r in rows], "{:,.1f}"),
        ("stream samples/s (ranged reads)", remote(lambda f: f.per_s), "{:,.0f}"),
        ("  after the first batch ", remote(lambda f: f.steady_per_s), "{:,.0f}"),
        ("time to first batch s (ranged)", remote(lambda f: f.first_batch_s), "{:.3f}"),
        ("worker private MiB (ranged)", remote(lambda f: f.worker_private_mib), "{:,.1f}"),
        ("storage requests/epoch", remote(lambda f: float(f.requests) if f.requests is not None else None), "{:,.0f}"),
        ("requests per 1k images", [r.requests_per_1k() for r in rows], "{:.2f}"),
        ("MiB read/epoch (ranged)", remote(lambda f: f.bytes / 2**20 if f.bytes is not None else None), "{:,.0f}"),
    ]


def ratio(values: list[float | None]) -> float | None:
    """Largest size's value over the smallest size's (rows are in the order measured)."""
    if len(values) < 2 or values[0] in (None, 0) or values[-1] is None:
        return None
    return values[-1] / values[0]  # type: ignore[operator]


def print_scale(rows: list[ScaleRow], cfg: BenchScaleConfig, con: Console) -> None:
    rows = sorted(rows, key=lambda r: r.records)
    table = Table(title=f"bench scale: cheap {cfg.image_size}x{cfg.image_size} raw records, batch {cfg.batch_size}, "
                        f"{cfg.workers} loader workers, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    table.add_column("figure")
    for r in rows:
        table.add_column(human(r.records), justify="right")
    if len(rows) > 1:
        table.add_column(f"{human(rows[-1].records)} / {human(rows[0].records)}", justify="right")
    for label, values, fmt in figures(rows):
        cells = ["-" if v is None else fmt.format(v) for v in values]
        if len(rows) > 1:
            q = ratio(values)
            cells.append("-" if q is None else f"{q:.2f}x")
        table.add_row(label, *cells)
    con.print(table)
    con.print("pack: the real pack() on one core from a cheap generated source (not rendered signs); "
              "local: memory-mapped shards; ranged: the object-store code path over the same files, every "
              "storage.read_bytes call counted. Worker memory is read by each loader worker from /proc/self; "
              "private = pages it wrote (its own cost), peak RSS also counts what it shares with its parent.",
              style="dim")
    con.print(summary(rows))


def summary(rows: list[ScaleRow]) -> str:
    rows = sorted(rows, key=lambda r: r.records)
    if len(rows) < 2:
        r = rows[0]
        return (f"{human(r.records)} records: pack {r.pack_us_per_image:.1f} us/image, stream "
                f"{r.local.per_s:,.0f} samples/s, worker private memory {r.local.worker_private_mib:.0f} MiB")
    a, b = rows[0], rows[-1]
    parts = [f"{human(b.records)} vs {human(a.records)} records ({b.records / a.records:.0f}x):",
             f"pack cost per image {b.pack_us_per_image / a.pack_us_per_image:.2f}x,",
             f"stream throughput {b.local.per_s / a.local.per_s:.2f}x,"]
    if a.local.worker_private_mib:
        parts.append(f"worker private memory {b.local.worker_private_mib / a.local.worker_private_mib:.2f}x")
    if b.requests_per_1k() is not None and a.requests_per_1k():
        parts.append(f", storage requests per image {b.requests_per_1k() / a.requests_per_1k():.2f}x")  # type: ignore[operator]
    return " ".join(parts).replace(" ,", ",")
