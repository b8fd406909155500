"""``signscale plan``: what a run of N images on G GPUs needs, from measured per-component rates.

The model is deliberately small: each component of an epoch has a rate, and the epoch takes as
long as its slowest component, because the components run concurrently and are pipelined (the
loader works ahead of the GPU, DDP overlaps the gradient all-reduce with the backward pass, reads
run ahead in the workers):

* **storage**: bytes read per epoch / (nodes x per-node bandwidth, capped by the bucket's
  aggregate), where bytes read = dataset bytes x the loader's read amplification;
* **CPU loading**: images / (GPUs x loader workers per GPU x samples/s per worker); a worker that
  reads from object storage is also bound by request latency: records per request / latency;
* **GPU compute**: images / (GPUs x training samples/s per GPU for the model and precision);
* **all-reduce**: optimizer steps x the ring all-reduce of the fp32 gradients
  (2 (G-1)/G x 4 bytes x params / bus bandwidth + a fixed latency per step).

The rates come from a table (``rates.json`` beside this module) in which every entry says what it
is, its unit, and how it was measured (the command, the machine) or, for hardware this machine does
not have, that it is an assumption and where the figure comes from. A user's file (JSON or YAML,
e.g. written by ``signscale plan --check --save-rates``) overrides entries key by key.

``check`` runs what can be run here at sizes the rates were *not* measured at and prints each
prediction beside its measurement with the relative error.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from signscale.config import ConfigError, Precision, check_precision

RATES_FILE = "rates.json"
HEADROOM = 1.2  # loader capacity over the GPU's consumption, so jitter in the workers never starves it


# ---------------------------------------------------------------------------------------------
# Rates


def default_rates() -> dict[str, Any]:
    """The packaged rates table (measured on the development machine; see each entry's ``how``)."""
    text = resources.files("signscale.bench").joinpath(RATES_FILE).read_text()
    return json.loads(text)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and "value" not in v:
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_rates(path: str = "") -> dict[str, Any]:
    """The packaged table, with ``path`` (JSON or YAML) merged over it key by key."""
    rates = default_rates()
    if not path:
        return rates
    if not os.path.exists(path):
        raise ConfigError(f"rates: {path} does not exist (write one with `signscale plan --check --save-rates {path}`)")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            user = yaml.safe_load(text)
        else:
            user = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is a bad file
        raise ConfigError(f"rates: {path} is not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'}: "
                          f"{exc}") from None
    if not isinstance(user, dict):
        raise ConfigError(f"rates: {path} must hold a mapping of rate names to entries, got {type(user).__name__}")
    unknown = [k for k in user if k not in rates and not k.startswith("_")]
    if unknown:
        raise ConfigError(f"rates: {path} has unknown entries {unknown}; known: {', '.join(sorted(rates))}")
    return _deep_merge(rates, user)


def rate(rates: dict[str, Any], *keys: str) -> float:
    """``rates[k1][k2]...["value"]`` as a float, or a ConfigError naming the missing path."""
    node: Any = rates
    for i, k in enumerate(keys):
        if not isinstance(node, dict) or k not in node:
            have = sorted(x for x in node if not x.startswith("_")) if isinstance(node, dict) else []
            raise ConfigError(f"rates: no entry {'.'.join(keys[:i + 1])}; have {', '.join(have) or 'nothing'} "
                              f"(add it to your --rates file; `signscale bench train` measures training rates)")
        node = node[k]
    value = node["value"] if isinstance(node, dict) else node
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"rates: {'.'.join(keys)} must be a number, got {value!r}") from None
    if v <= 0:
        raise ConfigError(f"rates: {'.'.join(keys)} must be > 0, got {v}")
    return v


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class PlanConfig:
    """A training run to size up."""

    images: int = 50_000_000
    gpus: int = 64
    gpus_per_node: int = 8
    model: str = "msnet"
    precision: Precision = "bf16"
    device: str = "h100"  # which rows of train_samples_per_s to use (cpu for this machine)
    image_size: int = 32
    batch_size: int = 256  # per GPU
    shard_mb: float = 64.0
    cores_per_node: int = 96
    pack_cores: int = 0  # 0: every core of every node (nodes x cores_per_node)
    workers_per_gpu: int = 0  # 0: as many as the GPU needs (capped by the node's cores)
    augment_on: str = "gpu"  # where augmentation runs: gpu (train does this on CUDA) or cpu (in the workers)
    source: str = "object-store"  # where the loader reads: object-store (ranged reads) or cache (local copy)
    epochs: int = 1
    rates: str = ""  # user rates file (JSON/YAML) merged over the packaged table

    def __post_init__(self) -> None:
        for name in ("images", "gpus", "gpus_per_node", "image_size", "batch_size", "cores_per_node", "epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.pack_cores < 0 or self.workers_per_gpu < 0:
            raise ConfigError("pack_cores, workers_per_gpu: must be >= 0 (0: derived)")
        if self.shard_mb <= 0:
            raise ConfigError(f"shard_mb: must be > 0, got {self.shard_mb}")
        if self.augment_on not in ("gpu", "cpu"):
            raise ConfigError(f"augment_on: expected gpu or cpu, got {self.augment_on!r}")
        if self.source not in ("object-store", "cache"):
            raise ConfigError(f"source: expected object-store or cache, got {self.source!r}")
        check_precision(self.precision)

    @property
    def nodes(self) -> int:
        return -(-self.gpus // self.gpus_per_node)


@dataclass
class Plan:
    cfg: PlanConfig
    record_bytes: int = 0
    records_per_shard: int = 0
    shards: int = 0
    storage_bytes: int = 0
    pack_seconds: float = 0.0
    pack_cores: int = 0
    gpu_rate: float = 0.0  # samples/s per GPU
    worker_rate: float = 0.0  # samples/s per loader worker (CPU and, for object storage, latency bound)
    workers_needed: int = 0  # per GPU, so the GPU never waits
    workers_used: int = 0
    cores_needed_per_node: int = 0
    requests_per_epoch: float = 0.0
    read_bytes_per_epoch: float = 0.0
    steps_per_epoch: int = 0
    components: dict[str, float] = field(default_factory=dict)  # seconds per epoch of each component
    notes: list[str] = field(default_factory=list)

    @property
    def epoch_seconds(self) -> float:
        return max(self.components.values())

    @property
    def bottleneck(self) -> str:
        return max(self.components, key=self.components.get)  # type: ignore[arg-type]

    def summary(self) -> str:
        c = self.cfg
        return (f"{c.images:,} images on {c.gpus} GPU(s) ({c.nodes} node(s)), {c.model} {c.precision}: "
                f"{self.storage_bytes / 1e9:,.1f} GB in {self.shards:,} shards, pack {_hms(self.pack_seconds)} on "
                f"{self.pack_cores:,} cores, epoch {_hms(self.epoch_seconds)} bound by {self.bottleneck}, "
                f"{self.workers_needed} loader worker(s) per GPU needed")


def _hms(s: float) -> str:
    if s < 120:
        return f"{s:.1f}s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def shard_layout(images: int, image_size: int, shard_mb: float) -> tuple[int, int, int, int]:
    """(record bytes, records per shard, shards, total bytes) exactly as pack() lays out raw shards."""
    from signscale.data import shards

    dt = shards.record_dtype("raw", (image_size, image_size, 3))
    rps = max(1, int(shard_mb * 2**20 // dt.itemsize))
    n_shards = -(-images // rps)

    def shard_bytes(count: int) -> int:  # the header (JSON, padded to 64 B) grows with the count and its sums
        return shards._header_bytes(shards.raw_header(dt, count))[1] + count * dt.itemsize

    full, last = divmod(images, rps)
    total = full * shard_bytes(rps) + (shard_bytes(last) if last else 0)
    return dt.itemsize, rps, n_shards, total


def allreduce_step_seconds(params: int, gpus: int, gpus_per_node: int, rates: dict[str, Any]) -> float:
    """Ring all-reduce of fp32 gradients: 2 (G-1)/G x bytes over the slowest link's bandwidth per GPU."""
    if gpus <= 1:
        return 0.0
    nbytes = 4 * params  # DDP reduces fp32 gradients whatever the autocast precision
    bw = rate(rates, "allreduce_intra_node_GBps") if gpus <= gpus_per_node else rate(rates, "allreduce_inter_node_GBps")
    return 2 * (gpus - 1) / gpus * nbytes / (bw * 1e9) + rate(rates, "allreduce_latency_s")


# The loader's remote reader (signscale.data.stream): blocks of BLOCK records, ranged reads, and the last
# READER_CACHE shard readers kept open per worker (a reader evicted and reopened re-reads its header).
BLOCK = 256
READER_CACHE = 16
WINDOW_BLOCKS = 8


def window_sharing(workers: int, batch_size: int) -> int:
    """How many workers of a rank fetch each block: the batches of one shuffle window are dealt out
    round-robin to the workers, and each worker fetches the blocks its batches touch."""
    batches_per_window = max(1, WINDOW_BLOCKS * BLOCK // batch_size)
    return max(1, min(workers, batches_per_window))


def ranged_reads(images: int, storage_bytes: int, shards: int, workers: int, batch_size: int,
                 rates: dict[str, Any]) -> tuple[float, float]:
    """(requests, bytes) one rank-set reads per epoch over ranged GETs: per block, each sharing worker
    issues ``requests_per_block`` reads plus a header re-read when the block's shard is not among its
    open readers (shards are visited in shuffled order, so that misses with probability 1 - 16/shards)."""
    share = window_sharing(workers, batch_size)
    miss = max(0.0, 1.0 - READER_CACHE / shards) if shards else 0.0
    requests = share * images / BLOCK * (rate(rates, "requests_per_block") + miss)
    return requests, share * storage_bytes * rate(rates, "read_amplification")


def model_params(name: str, image_size: int) -> int:
    from signscale.models import create_model, model_info

    return int(model_info(create_model(name, 43), image_size)["params"])


def plan(cfg: PlanConfig, rates: dict[str, Any] | None = None) -> Plan:
    """Predict storage, packing, and the epoch's components for ``cfg``."""
    rates = rates if rates is not None else load_rates(cfg.rates)
    p = Plan(cfg)
    p.record_bytes, p.records_per_shard, p.shards, p.storage_bytes = shard_layout(cfg.images, cfg.image_size,
                                                                                  cfg.shard_mb)
    px = (cfg.image_size / 32) ** 2  # per-image CPU costs were measured at 32 px and scale with pixels
    _plan_packing(p, cfg, rates, px)
    _plan_loader(p, cfg, rates, px)
    _plan_reads(p, cfg, rates)
    _plan_epoch(p, cfg, rates)
    return p


def _plan_packing(p: Plan, cfg: PlanConfig, rates: dict[str, Any], px: float) -> None:
    """Packing: decoding on every core, or the uploads, whichever is slower."""
    p.pack_cores = cfg.pack_cores or cfg.nodes * cfg.cores_per_node
    decode_s = cfg.images / (rate(rates, "pack_decode_per_core") / px * p.pack_cores)
    write_s = p.storage_bytes / (cfg.nodes * rate(rates, "storage_node_GBps") * 1e9)  # packing nodes upload it all
    p.pack_seconds = max(decode_s, write_s)
    if write_s > decode_s:
        p.notes.append(f"packing is bound by uploads ({_hms(write_s)}), not by decoding ({_hms(decode_s)})")


def _plan_loader(p: Plan, cfg: PlanConfig, rates: dict[str, Any], px: float) -> None:
    """The loader workers a GPU needs, how many a node's cores allow, and what each delivers."""
    p.gpu_rate = rate(rates, "train_samples_per_s", cfg.device, cfg.model, cfg.precision)
    per_worker_cpu = rate(rates, "loader_aug_per_worker" if cfg.augment_on == "cpu" else "loader_raw_per_worker") / px
    one, _ = ranged_reads(BLOCK * 1000, 1, p.shards, 1, cfg.batch_size, rates)
    requests_per_block = one / 1000
    latency = rate(rates, "storage_request_latency_s")

    def worker_rate(workers: int) -> float:
        """Samples/s one of ``workers`` workers delivers. Over ranged GETs, issued one after another, a
        worker waits one latency per request, and it fetches every block its batches touch: with
        ``share`` workers per window, ``share`` blocks' requests for each block's worth of samples."""
        if cfg.source != "object-store":
            return per_worker_cpu
        bound = BLOCK / (window_sharing(workers, cfg.batch_size) * requests_per_block * latency)
        return min(per_worker_cpu, bound)

    want = p.gpu_rate * HEADROOM
    p.workers_needed = next((w for w in range(1, 4097) if w * worker_rate(w) >= want), 4097)
    cores_for_workers = cfg.cores_per_node // min(cfg.gpus, cfg.gpus_per_node) - 1  # one core per trainer
    p.workers_used = cfg.workers_per_gpu or max(1, min(p.workers_needed, cores_for_workers))
    p.worker_rate = worker_rate(p.workers_used)
    if p.worker_rate < per_worker_cpu:
        p.notes.append(f"object-store reads are latency-bound: {p.worker_rate:,.0f} samples/s per worker at "
                       f"{p.workers_used} workers ({BLOCK / requests_per_block:,.0f} records per request, each worker "
                       f"fetching the blocks of {window_sharing(p.workers_used, cfg.batch_size)} workers' batches); "
                       "a whole-shard cache (StreamConfig.cache_dir) removes it")
    p.cores_needed_per_node = min(cfg.gpus, cfg.gpus_per_node) * (p.workers_needed + 1)
    if p.workers_needed > cores_for_workers and not cfg.workers_per_gpu:
        p.notes.append(f"a node needs {p.cores_needed_per_node} cores to keep its GPUs fed, has "
                       f"{cfg.cores_per_node}: the loader caps the epoch (augment on the GPU, or more cores)")


def _plan_reads(p: Plan, cfg: PlanConfig, rates: dict[str, Any]) -> None:
    """Requests and bytes an epoch reads: ranged GETs from the store, or whole shards into a cache."""
    if cfg.source == "object-store":
        p.requests_per_epoch, p.read_bytes_per_epoch = ranged_reads(cfg.images, p.storage_bytes, p.shards,
                                                                    p.workers_used, cfg.batch_size, rates)
        share = window_sharing(p.workers_used, cfg.batch_size)
        if share > 1:
            p.notes.append(
                f"each block is fetched by {share} workers of a rank (a shuffle window's batches are dealt "
                f"round-robin): {p.read_bytes_per_epoch / p.storage_bytes:.1f}x the dataset's bytes per epoch"
            )
    else:
        p.read_bytes_per_epoch = p.storage_bytes  # first epoch fills the cache; later epochs read it locally
        p.requests_per_epoch = p.shards + cfg.nodes  # whole-shard GETs; ranks read contiguous regions


def _plan_epoch(p: Plan, cfg: PlanConfig, rates: dict[str, Any]) -> None:
    """The epoch's components side by side (the slowest bounds it), and the GET rate it implies."""
    storage_bw = min(cfg.nodes * rate(rates, "storage_node_GBps"), rate(rates, "storage_aggregate_GBps")) * 1e9
    p.steps_per_epoch = -(-cfg.images // (cfg.gpus * cfg.batch_size))
    p.components = {
        "storage": p.read_bytes_per_epoch / storage_bw,
        "CPU loading": cfg.images / (cfg.gpus * p.workers_used * p.worker_rate),
        "GPU compute": cfg.images / (cfg.gpus * p.gpu_rate),
        "all-reduce": p.steps_per_epoch * allreduce_step_seconds(model_params(cfg.model, cfg.image_size), cfg.gpus,
                                                                 cfg.gpus_per_node, rates),
    }
    per_s = p.requests_per_epoch / max(p.components.values())
    if cfg.source == "object-store" and per_s > 5500:
        p.notes.append(f"the epoch issues {per_s:,.0f} GET/s; S3 serves about 5,500 GET/s per prefix, so spread the "
                       f"shards over at least {math.ceil(per_s / 5500)} prefixes (or use a shard cache)")


def plan_rows(p: Plan) -> list[tuple[str, str]]:
    """(figure, value) lines for printing."""
    c = p.cfg
    rows = [
        ("nodes x GPUs", f"{c.nodes} x {min(c.gpus, c.gpus_per_node)} ({c.gpus} GPUs)"),
        ("record size", f"{p.record_bytes:,} B ({c.image_size}x{c.image_size} raw + metadata)"),
        ("storage", f"{p.storage_bytes / 1e9:,.2f} GB ({p.storage_bytes / 2**30:,.2f} GiB)"),
        ("shards", f"{p.shards:,} of {p.records_per_shard:,} records ({c.shard_mb:g} MiB)"),
        ("pack time", f"{_hms(p.pack_seconds)} on {p.pack_cores:,} cores"),
        ("GPU rate", f"{p.gpu_rate:,.0f} samples/s per GPU ({c.device}, {c.model}, {c.precision})"),
        ("loader worker rate", f"{p.worker_rate:,.0f} samples/s (augment on {c.augment_on}, from {c.source})"),
        ("loader workers per GPU", (f"{p.workers_needed} needed, {p.workers_used} used "
                                    f"({p.cores_needed_per_node} cores per node needed)")),
        ("storage per epoch", f"{p.read_bytes_per_epoch / 1e9:,.1f} GB read, {p.requests_per_epoch:,.0f} requests"),
        ("steps per epoch", f"{p.steps_per_epoch:,} (batch {c.batch_size} per GPU)"),
    ]
    for name, s in p.components.items():
        rows.append((f"epoch: {name}", _hms(s) + ("  <- bottleneck" if name == p.bottleneck else "")))
    rows.append(("epoch time", f"{_hms(p.epoch_seconds)}; {c.epochs} epoch(s): {_hms(p.epoch_seconds * c.epochs)}"))
    return rows


# ---------------------------------------------------------------------------------------------
# Check: predictions against runs done here


@dataclass(frozen=True)
class CheckConfig:
    images: int = 200_000  # records packed and streamed for the check (not a size the rates came from)
    train_steps: int = 40  # CPU training steps for the end-to-end check
    model: str = "small_cnn"
    workers: int = 1
    rates: str = ""
    save_rates: str = ""  # write the rates measured here to this file (JSON), usable as --rates

    def __post_init__(self) -> None:
        if self.images < 1000:
            raise ConfigError(f"images: the check needs at least 1000, got {self.images}")
        if self.train_steps < 0 or self.workers < 0:
            raise ConfigError("train_steps, workers: must be >= 0")


@dataclass
class CheckRow:
    what: str
    predicted: float
    measured: float
    unit: str
    how: str = ""

    @property
    def error(self) -> float:
        return (self.predicted - self.measured) / self.measured if self.measured else float("inf")


def check(cfg: CheckConfig, *, say: Any = print) -> list[CheckRow]:
    """Pack, stream and train here; compare each figure with what the rates table predicted."""
    import shutil
    import tempfile

    rates = load_rates(cfg.rates)
    rows: list[CheckRow] = []
    root = tempfile.mkdtemp(prefix="signscale-check-")
    try:
        out = os.path.join(root, "data")
        rows += _check_pack(cfg, out, rates, say)
        rows.append(_check_loader(out, rates, say))
        rows += _check_reads(cfg, out, rates, say)
        if cfg.train_steps:
            rows.append(_check_train(cfg, out, root, rates, say))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if cfg.save_rates:
        _save_measured(cfg.save_rates, rows, cfg.images)
    return rows


def _check_pack(cfg: CheckConfig, out: str, rates: dict[str, Any], say: Any) -> list[CheckRow]:
    from signscale.bench.scale import NOISE_KIND, noise_source_registered
    from signscale.data.pack import PackConfig, pack

    n = cfg.images
    _, _, n_shards, total = shard_layout(n, 32, 64.0)
    say(f"pack {n:,} cheap records on one core ...")
    # CPU seconds, not wall: on a shared machine the wall time says how much of a core other jobs left
    cpu0 = time.process_time()
    with noise_source_registered():
        res = pack(PackConfig(source=f"{NOISE_KIND}:?n={n}&size=32", out=out, image_size=32, workers=0, progress=False))
    pack_cpu = time.process_time() - cpu0
    return [CheckRow("storage bytes", total, res.bytes, "B", "record layout x count"),
            CheckRow("shards", n_shards, res.shards, "", "ceil(count / records per shard)"),
            CheckRow("pack CPU time (cheap source)", n / rate(rates, "pack_cheap_per_core"), pack_cpu,
                     "s", "count / pack_cheap_per_core")]


def _check_loader(out: str, rates: dict[str, Any], say: Any) -> CheckRow:
    from signscale.bench.readers import children_cpu, loader_augment
    from signscale.data.manifest import Manifest
    from signscale.data.stream import open_stream

    say("one epoch of BatchAugment in one loader worker ...")
    # A real worker (DataLoader worker threads default to one), timed by the OS once it exits: the
    # rate is per worker, hand-off to the main process included.
    loader = open_stream(out, num_workers=1, batch_size=256, shuffle=True)
    loader.stream.transform = loader_augment(32, Manifest.load(out).label_space.flip_map())
    kids0 = children_cpu()
    seen = sum(int(b["image"].shape[0]) for b in loader)
    del loader
    aug_cpu = children_cpu() - kids0
    return CheckRow("loader CPU time, slice + BatchAugment in one worker", seen / rate(rates, "loader_aug_per_worker"),
                    aug_cpu, "s", "count / loader_aug_per_worker")


def _check_reads(cfg: CheckConfig, out: str, rates: dict[str, Any], say: Any) -> list[CheckRow]:
    from signscale.bench.readers import RequestCounter
    from signscale.bench.scale import SCALEFS, BenchScaleConfig, _register_scalefs, stream_epoch

    n = cfg.images
    _, _, n_shards, total = shard_layout(n, 32, 64.0)
    say("stream one epoch over ranged reads, counting requests ...")
    _register_scalefs()
    counter = RequestCounter()
    with counter.installed():
        fig = stream_epoch(f"{SCALEFS}://{os.path.abspath(out)}", BenchScaleConfig(sizes=(n,), workers=cfg.workers),
                           counter)
    req, nbytes = ranged_reads(n, total, n_shards, cfg.workers, 256, rates)
    return [CheckRow(f"storage requests per epoch, {cfg.workers} worker(s)", req, float(fig.requests or 0), "",
                     "workers sharing a window x blocks x (requests_per_block + header misses)"),
            CheckRow(f"bytes read per epoch, {cfg.workers} worker(s)", nbytes, float(fig.bytes or 0), "B",
                     "workers sharing a window x storage bytes x read_amplification")]


def _check_train(cfg: CheckConfig, data: str, root: str, rates: dict[str, Any], say: Any) -> CheckRow:
    """End-to-end CPU training: the trainer and the augmenting worker run concurrently, so the plan
    predicts min(compute rate, loader rate) when there are cores for both, their serial sum otherwise."""
    from signscale.training.train import TrainConfig, train

    say(f"train {cfg.model} fp32 on CPU for {cfg.train_steps} steps, {cfg.workers} worker(s) ...")
    res = train(TrainConfig(data=(data,), out=os.path.join(root, "run"), model=cfg.model, max_steps=cfg.train_steps,
                            batch_size=256, workers=cfg.workers, progress=False, ema=0, device="cpu",
                            log_every=10**9))
    compute = rate(rates, "train_samples_per_s", "cpu", cfg.model, "fp32")
    loader = rate(rates, "loader_aug_per_worker")
    cores = os.cpu_count() or 1
    if cfg.workers == 0:
        predicted = 1 / (1 / compute + 1 / loader)  # one process does both, one after the other
        how = "1 / (1/train + 1/loader): serial in one process"
    elif cores >= cfg.workers + 1:
        predicted = min(compute, cfg.workers * loader)
        how = "min(train rate, workers x loader rate): concurrent"
    else:
        predicted = 1 / (1 / compute + 1 / loader)
        how = "cores shared: serial"
    return CheckRow(f"train samples/s, {cfg.model} fp32 CPU", predicted, res.samples_per_s, "samples/s", how)


def _save_measured(path: str, rows: list[CheckRow], n: int) -> None:
    """The rates measured by this check, as a --rates file."""
    by = {r.what.split(",")[0]: r for r in rows}
    how = f"measured: signscale plan --check --check-images {n} on {os.uname().nodename}, {time.strftime('%Y-%m-%d')}"
    out: dict[str, Any] = {}
    if "pack CPU time (cheap source)" in by:
        out["pack_cheap_per_core"] = {"value": n / by["pack CPU time (cheap source)"].measured,
                                      "unit": "images per CPU-second", "how": how}
    if "loader CPU time" in by:
        out["loader_aug_per_worker"] = {"value": n / by["loader CPU time"].measured,
                                        "unit": "samples per CPU-second", "how": how}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, path)
