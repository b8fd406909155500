"""``evaluate(EvalConfig) -> EvalReport``: score a model artefact on a packed dataset or a source.

What is scored, and how (docs/evaluation.md has the user's version):

* **The model** is loaded checksum-verified with ``weights_only`` (:func:`checkpoint.load_model_artefact`),
  rebuilt from its plain config and fed through exactly the preprocessing stored with it
  (:func:`transforms.to_input`), so an evaluation never sees other inputs than serving does.
* **The data** is either a packed dataset URL, read by the streaming loader with ``shuffle=False``
  and ``remainder="pad"`` (every sample exactly once over all ranks; pad rows are dropped here), or
  a source spec such as ``gtsrb-test:/data/GTSRB_Final_Test_Images.zip``, read, decoded and resized
  to the model's input size in DataLoader workers, each rank taking one contiguous run of indices.
* **Nothing is dropped silently.** Entries a source cannot read (``Problem``), images that do not
  decode, labels outside the model's label space and, for packed data, what ``pack`` quarantined,
  are counted by reason under ``skipped`` and never scored.
* **Metrics are sums.** Everything reported is computed from a confusion matrix, per-bin calibration
  sums and per-group (count, correct) pairs, all integers (float sums in fixed point, see
  ``CONF_SCALE``), so ranks add their tallies with ``all_reduce_sum`` and any number of processes,
  or any batch size, gives the single-process numbers to the last digit.
* **Corruptions are a function of the sample.** Sample ``id`` under corruption ``k`` (its index in
  :data:`corruptions.KINDS`: weather and camera faults) at severity ``s`` draws from
  ``np.random.default_rng([seed, k, s, id])``: the same image gets the same pixels whatever the
  batch size, the worker count or the number of ranks, and whichever other corruptions were asked for.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from signscale import __version__, calibration, images, storage, tta
from signscale import config as config_mod
from signscale.config import Precision
from signscale.corruptions import KINDS, SEVERITIES
from signscale.evaluation import metrics_json
from signscale.evaluation.metrics import (
    COVERAGES,
    EVAL_FORMAT,
    EVAL_VERSION,
    NLL_SCALE,
    EvalError,
    cross_country_confusions,
    expected_calibration_error,
    label_map,
    per_class,
    unfixed,
)
from signscale.evaluation.metrics_json import number, plain
from signscale.evaluation.robustness import bin_counts, brightness_bins, pair_groups, with_variants
from signscale.evaluation.tally import Tally
from signscale.labels import COUNTRIES, LabelSpace
from signscale.training import checkpoint, distributed, precision
from signscale.transforms import Preprocess, to_input

__all__ = ["EvalConfig", "EvalError", "EvalReport", "LoadedModel", "evaluate", "label_map", "read_model",
           "score_predictions"]

DEFAULT_DATA = "synthetic:?n=2000&seed=1000"  # a seed no default training set uses


# ---------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate, on what, and how."""

    model: str  # model artefact folder (model.json + model.pt), any storage URL
    data: str = DEFAULT_DATA  # packed dataset URL, or a source spec KIND:LOCATION?opts (see `signscale sources`)
    out: str = ""  # report folder (metrics.json, PNGs, report.html); empty: write nothing
    batch_size: int = 512
    workers: int = 2  # loader processes (0: read in this process)
    device: str = "auto"  # auto | cpu | cuda
    precision: Precision = "fp32"
    corruptions: tuple[str, ...] = ()  # kinds from corruptions.KINDS (weather and camera faults), or "all"
    severities: tuple[int, ...] = (3,)  # 1..5
    seed: int = 0  # corruption randomness (see the module docstring)
    examples: int = 20  # most frequent confusions listed, each with example images
    # sources: crop to the sign's ROI before resizing (as `pack --crop roi`); auto: as the model's training data
    crop: Literal["auto", "none", "roi"] = "auto"
    threads: int = 0  # torch intra-op threads in this process while evaluating (0: torch's default)
    progress: bool = True
    # test-time augmentation: also score the mirror image where the flip rules allow it (see signscale.tta)
    tta: bool = False

    def __post_init__(self) -> None:
        if not self.model:
            raise config_mod.ConfigError("model: give the model artefact folder to evaluate (e.g. runs/x/model)")
        if not self.data:
            raise config_mod.ConfigError("data: give a packed dataset URL or a source spec such as gtsrb-test:PATH")
        if self.batch_size < 1:
            raise config_mod.ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise config_mod.ConfigError(f"workers: must be >= 0, got {self.workers}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise config_mod.ConfigError(f"device: expected auto, cpu or cuda, got {self.device!r}")
        config_mod.check_precision(self.precision)
        unknown = [c for c in self.corruptions if c not in KINDS and c != "all"]
        if unknown:
            raise config_mod.ConfigError(f"corruptions: unknown kind {unknown[0]!r}; valid: all, "
                                         f"{', '.join(KINDS)}")
        bad = [s for s in self.severities if s not in SEVERITIES]
        if bad or not self.severities:
            raise config_mod.ConfigError(f"severities: each must be an integer 1..5, got {list(self.severities)}")
        if self.seed < 0:
            raise config_mod.ConfigError(f"seed: must be >= 0, got {self.seed}")
        if self.examples < 0:
            raise config_mod.ConfigError(f"examples: must be >= 0, got {self.examples}")
        if self.crop not in ("auto", "none", "roi"):
            raise config_mod.ConfigError(f"crop: expected auto, none or roi, got {self.crop!r}")
        if self.threads < 0:
            raise config_mod.ConfigError(f"threads: must be >= 0, got {self.threads}")

    def corruption_kinds(self) -> tuple[str, ...]:
        """The requested corruptions in :data:`KINDS` order, ``all`` expanded, repeats removed."""
        wanted = set(KINDS) if "all" in self.corruptions else set(self.corruptions)
        return tuple(c for c in KINDS if c in wanted)

    def pairs(self) -> list[tuple[str, int]]:
        """(corruption, severity) pairs to evaluate, corruption-major."""
        return [(c, s) for c in self.corruption_kinds() for s in sorted(set(self.severities))]

    def data_is_source(self) -> bool:
        """True when ``data`` is a source spec (``KIND:...`` with a known KIND), not a dataset URL."""
        from signscale.data.sources import SOURCES

        kind, sep, _ = self.data.partition(":")
        return bool(sep) and kind in SOURCES


# ---------------------------------------------------------------------------------------------
# Metric functions: plain numpy, on labels and predictions or on the sums they reduce to


def score_predictions(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """The headline metrics of one set of predictions: for tests and notebooks.

    ``labels`` [N] class ids, ``probs`` [N, C] class probabilities. Returns ``top1``, ``top5``,
    ``macro_f1``, ``balanced_accuracy``, ``ece``, ``nll``, ``error_at_99_coverage``,
    ``error_at_95_coverage``, ``confusion`` and the :func:`per_class` arrays.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    tally = Tally(probs.shape[1], 1, 1, 0)
    tally.add(torch.from_numpy(np.log(np.maximum(probs, 1e-300))), torch.from_numpy(labels),
              ids=np.arange(len(labels)), keep=np.ones(len(labels), dtype=bool), images=None, meta={})
    return {**_summary_numbers(tally), "confusion": tally.confusion, **per_class(tally.confusion)}


def _summary_numbers(t: Tally) -> dict[str, float]:
    pc = per_class(t.confusion)
    n = int(t.confusion.sum())
    supported = pc["support"] > 0
    sel = t.selective()
    return {
        "count": n,
        "correct": int(pc["tp"].sum()),
        "top1": float(pc["tp"].sum() / n) if n else math.nan,
        "top5": float(t.top5 / n) if n else math.nan,
        "macro_f1": float(pc["f1"][supported].mean()) if supported.any() else math.nan,
        "balanced_accuracy": float(pc["recall"][supported].mean()) if supported.any() else math.nan,
        "ece": expected_calibration_error(t.calibration),
        "nll": float(t.nll_fixed / NLL_SCALE / n) if n else math.nan,
        "mean_confidence": float(t.calibration[:, 1].sum() / n) if n else math.nan,
        **{f"error_at_{round(100 * c)}_coverage": sel["error_at"][c] for c in COVERAGES},
        # the same figures before the model's temperature (and TTA): what calibration changed
        "ece_uncalibrated": expected_calibration_error(unfixed(t.calibration_raw_fixed)),
        "nll_uncalibrated": float(t.nll_raw_fixed / NLL_SCALE / n) if n else math.nan,
    }


# ---------------------------------------------------------------------------------------------
# Data: both paths yield the same batch dicts


class _StreamBatches(IterableDataset):
    """A packed dataset's batches (this rank's exactly-once share), with corrupted copies made in the worker."""

    def __init__(self, stream: Any, pairs: Sequence[tuple[str, int]], seed: int) -> None:
        super().__init__()
        self.stream, self.pairs, self.seed = stream, list(pairs), seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for b in self.stream:  # ShardStream works out the rank and the worker itself
            if "meta" in b:  # metadata packed into one matrix for the trip between processes
                from signscale.data.stream import unpack_batch

                b = unpack_batch(b)
            n = len(b["label"])
            yield with_variants({"image": b["image"], "label": b["label"], "id": b["id"], "pad": b["pad"],
                                  "condition": b["condition"], "country": b["country"],
                                  "source": torch.zeros(n, dtype=torch.int64)}, self.pairs, self.seed)


class _SourceBatches(Dataset):
    """Batches of a source's samples ``indices``, read, decoded and resized in the worker.

    An entry that cannot be scored comes back under ``skips`` as (key, reason, detail): a source's
    Problem, an image that does not decode, or metadata the dataset format could not hold either.
    """

    def __init__(self, source: Any, indices: np.ndarray, *, batch_size: int, size: int, crop: str,
                 pairs: Sequence[tuple[str, int]], seed: int) -> None:
        self.source, self.indices, self.batch_size, self.size, self.crop = source, indices, batch_size, size, crop
        self.pairs, self.seed = list(pairs), seed

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __getitem__(self, j: int) -> dict[str, Any]:
        from signscale.data.sources import CONDITIONS, Problem

        rows: list[tuple[np.ndarray, int, int, int, int, int, str]] = []
        skips: list[tuple[str, str, str]] = []
        for i in self.indices[j * self.batch_size:(j + 1) * self.batch_size].tolist():
            item = self.source.read(i)
            if isinstance(item, Problem):
                skips.append((item.key, item.reason, item.detail))
                continue
            if not 0 <= item.label < len(self.source.label_space):
                skips.append((item.key, "label_out_of_range", f"label {item.label}"))
                continue
            if item.condition not in CONDITIONS or item.country not in COUNTRIES:
                reason = "unknown_condition" if item.condition not in CONDITIONS else "unknown_country"
                skips.append((item.key, reason, f"condition={item.condition!r}, country={item.country!r}"))
                continue
            try:
                arr = self._pixels(item)
            except images.ImageError as exc:
                skips.append((item.key, exc.reason, exc.detail))
                continue
            # one source, one entry in the per-source table (index 0)
            rows.append((arr, item.label, i, CONDITIONS.index(item.condition), COUNTRIES.index(item.country), 0,
                         item.key))
        s = self.size
        batch = {
            "image": torch.from_numpy(np.stack([r[0] for r in rows]) if rows else np.zeros((0, s, s, 3), np.uint8)),
            **{k: torch.tensor([r[c] for r in rows], dtype=torch.int64)
               for c, k in ((1, "label"), (2, "id"), (3, "condition"), (4, "country"), (5, "source"))},
            "pad": torch.zeros(len(rows), dtype=torch.bool), "keys": [r[6] for r in rows], "skips": skips,
        }
        return with_variants(batch, self.pairs, self.seed)

    def _pixels(self, item: Any) -> np.ndarray:
        if isinstance(item.image, np.ndarray):
            arr = item.image
            if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
                raise images.ImageError("bad_array", f"expected HxWx3 uint8, got {arr.shape} {arr.dtype}")
        elif item.image is None:
            raise images.ImageError("empty", "source returned no image")
        else:
            arr = images.decode(item.image)
        if self.crop == "roi" and item.roi is not None:
            arr = images.crop_box(arr, item.roi)
        return images.resize(arr, self.size)


@dataclass
class _Data:
    """What an evaluation reads, whichever the path: description, tables and a loader factory."""

    kind: Literal["dataset", "source"]
    label_space: LabelSpace
    conditions: list[str]
    countries: list[str]
    source_names: list[str]
    description: dict[str, Any]
    at_pack: dict[str, int]  # entries quarantined when the dataset was packed (never scored)
    image_size: int  # pixels of the images the loader yields (corrupted at this size)
    loader: Callable[[Sequence[tuple[str, int]]], Iterable[dict[str, Any]]]
    batches: int  # this rank's batches per pass


def _mp_context() -> str:
    import multiprocessing as mp

    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


def _dataloader(ds: Dataset | IterableDataset, workers: int, pin: bool) -> DataLoader:
    kw: dict[str, Any] = {"prefetch_factor": 2, "multiprocessing_context": _mp_context()} if workers > 0 else {}
    return DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin, **kw)


def open_data(cfg: EvalConfig, pre: Preprocess, rank: int, world: int, pin: bool) -> _Data:
    if cfg.data_is_source():
        return _open_source(cfg, pre, rank, world, pin)
    return _open_dataset(cfg, pre, rank, world, pin)


def _open_dataset(cfg: EvalConfig, pre: Preprocess, rank: int, world: int, pin: bool) -> _Data:
    from signscale.data.manifest import Manifest
    from signscale.data.shards import ShardError
    from signscale.data.stream import ShardStream, StreamConfig

    try:
        manifest = Manifest.load(cfg.data)
    except ShardError as exc:
        import difflib

        from signscale.data.sources import SOURCES

        kind = cfg.data.partition(":")[0] if ":" in cfg.data and "://" not in cfg.data else ""
        close = difflib.get_close_matches(kind, SOURCES, n=1) if kind else []
        hint = f" (did you mean the source kind {close[0]!r}?)" if close else ""
        raise EvalError(f"{exc}; or give a source spec{hint} (KIND:LOCATION, see `signscale sources`) "
                        f"such as gtsrb-test:/data/GTSRB_Final_Test_Images.zip") from None
    encoded = manifest.encoding == "encoded"
    stream = ShardStream(StreamConfig(datasets=(cfg.data,), batch_size=cfg.batch_size, shuffle=False,
                                      remainder="pad", image_size=pre.image_size if encoded else 0),
                         rank=rank, world_size=world)
    name = str(manifest.data.get("source", {}).get("kind") or manifest.name or "dataset")
    quarantine = manifest.data.get("quarantine", {})
    description = {"spec": cfg.data, "kind": "dataset", "name": manifest.name, "id": f"dataset:{manifest.checksum()}",
                   "checksum": manifest.checksum(), "version": manifest.data.get("version"),
                   "encoding": manifest.encoding, "image_shape": manifest.image_shape,
                   "source": manifest.data.get("source", {})}
    return _Data("dataset", manifest.label_space, manifest.conditions, manifest.countries, [name], description,
                 dict(quarantine.get("by_reason", {})), stream.image_size,
                 lambda pairs: _dataloader(_StreamBatches(stream, pairs, cfg.seed), cfg.workers, pin), len(stream))


def _open_source(cfg: EvalConfig, pre: Preprocess, rank: int, world: int, pin: bool) -> _Data:
    from signscale.data.sources import CONDITIONS, SourceError, open_source

    try:
        source = open_source(cfg.data)
    except SourceError as exc:
        raise EvalError(str(exc)) from None
    n = len(source)
    per = -(-n // world)
    indices = np.arange(min(n, rank * per), min(n, (rank + 1) * per), dtype=np.int64)
    names = [source.kind or "source"]
    description = {
        "spec": cfg.data,
        "kind": "source",
        "name": source.kind,
        "id": f"source:{source.spec or cfg.data}",
        "checksum": None,
        "version": None,
        "encoding": None,
        "image_shape": [pre.image_size, pre.image_size, 3],
        "source": plain(source.describe()),
    }

    def loader(pairs: Sequence[tuple[str, int]]) -> DataLoader:
        ds = _SourceBatches(source, indices, batch_size=cfg.batch_size, size=pre.image_size, crop=cfg.crop, pairs=pairs,
                            seed=cfg.seed)
        return _dataloader(ds, cfg.workers, pin)

    return _Data(
        "source",
        source.label_space,
        list(CONDITIONS),
        list(COUNTRIES),
        names,
        description,
        {},
        pre.image_size,
        loader,
        -(-len(indices) // cfg.batch_size),
    )


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class EvalReport:
    """The metrics (stable JSON, docs/evaluation.md), the files written, and the pictures' raw material."""

    metrics: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)
    # images of each entry of metrics["top_confusions"] (uint8 HxWx3), and one correctly classified
    # image per class id: what the report draws, not part of the JSON
    example_images: list[list[np.ndarray]] = field(default_factory=list, repr=False)
    class_images: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def summary(self) -> str:
        m = self.metrics
        o, skipped = m["overall"], m["skipped"]["total"]
        rob = m.get("robustness")
        mca = f", mCA {pct(rob['mca'])}" if rob else ""
        skip = ""
        if skipped:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(m["skipped"]["by_reason"].items()))
            skip = f" ({reasons})"
        temp = m["calibration"].get("temperature", 1.0)
        ece = (f"ECE {_fmt(o['ece'], '.4f')} (T={temp:.3g}; {_fmt(o.get('ece_uncalibrated'), '.4f')} at T=1)"
               if temp != 1.0 else f"ECE {_fmt(o['ece'], '.4f')}")
        sel = (f", error at 99%/95% coverage {pct(o.get('error_at_99_coverage'))}/"
               f"{pct(o.get('error_at_95_coverage'))}")
        return (f"top-1 {pct(o['top1'])}, macro-F1 {_fmt(o['macro_f1'], '.4f')}, {ece}{sel}{mca} "
                f"on {o['count']:,} images at {m['run']['images_per_s']:,.0f} images/s; {skipped:,} skipped{skip}"
                + (f"; report: {self.files['report']}" if "report" in self.files else ""))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.metrics, indent=indent, allow_nan=False)


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _metrics(cfg: EvalConfig, t: Tally, *, model_info: dict[str, Any], data: _Data, space: LabelSpace,
             mapping: str, pairs: list[tuple[str, int]], world: int, device: torch.device) -> dict[str, Any]:
    """The ``metrics.json`` document (docs/evaluation.md), section by section (:mod:`.metrics_json`)."""
    head = _summary_numbers(t)
    skipped = metrics_json.skipped(t, data.label_space, data.at_pack)
    n_scored, n_skipped = head["count"], skipped["total"]
    return plain({
        "format": EVAL_FORMAT,
        "version": EVAL_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "signscale_version": __version__,
        "config": config_mod.to_dict(cfg),
        "model": model_info,
        "data": {**data.description, "label_space": data.label_space.name,
                 "label_space_fingerprint": data.label_space.fingerprint(), "label_mapping": mapping,
                 "entries": n_scored + n_skipped, "scored": n_scored, "skipped": n_skipped},
        "run": {"world_size": world, "device": device.type, "precision": cfg.precision, "batch_size": cfg.batch_size,
                "workers": cfg.workers, "seconds": round(t.seconds, 3),
                "images_per_s": n_scored / t.seconds if t.seconds > 0 else 0.0},
        "overall": {k: number(v) for k, v in head.items()},
        "classes": metrics_json.classes(t.confusion, space),
        "confusion": {"labels": space.keys, "matrix": t.confusion.tolist()},
        "calibration": metrics_json.calibration(t, head, model_info, cfg.tta),
        "selective": metrics_json.selective(t),
        "conditions": metrics_json.groups(t.conditions, data.conditions),
        "countries": metrics_json.groups(t.countries, data.countries),
        "cross_country_confusions": cross_country_confusions(t.confusion, space),
        "sources": metrics_json.groups(t.sources, data.source_names),
        "robustness": metrics_json.robustness(t, pairs, cfg.seed, head["top1"]),
        "top_confusions": metrics_json.top_confusions(t, space.keys, cfg.examples),
        "skipped": skipped,
    })


# ---------------------------------------------------------------------------------------------
# evaluate()


@dataclass(frozen=True)
class LoadedModel:
    """A model artefact read and checksum-verified once (:func:`read_model`), so several evaluations of
    one model (the gate's sets) share it rather than each reading and verifying it again."""

    url: str
    network: torch.nn.Module
    meta: dict[str, Any]


def read_model(url: str) -> LoadedModel:
    """``url``'s network and metadata by the one loader, :func:`checkpoint.load_model`."""
    try:
        network, meta = checkpoint.load_model(url)
    except FileNotFoundError as exc:
        raise EvalError(f"{url}: cannot read the model artefact ({exc})") from None
    return LoadedModel(url, network, meta)


def load_model(url: str, device: torch.device, loaded: LoadedModel | None = None
               ) -> tuple[torch.nn.Module, LabelSpace, Preprocess, dict[str, Any]]:
    """(network on ``device``, label space, preprocessing, the report's model section); ``loaded``: ``url``
    already read by :func:`read_model`, used instead of reading it again."""
    if loaded is None:
        loaded = read_model(url)
    elif loaded.url != url:
        raise EvalError(f"{url}: the loaded model given is {loaded.url}; pass the one read from {url}")
    model, meta = loaded.network, loaded.meta
    model.to(device)
    space = LabelSpace.from_dict(meta["label_space"])
    pre = Preprocess.from_dict(meta["preprocess"])
    cfg = meta["model_config"]
    try:
        temperature = calibration.temperature_of(meta, where=storage.join(url, "model.json"))
    except calibration.CalibrationError as exc:
        raise EvalError(str(exc)) from None
    info = {"url": url, "sha256": meta.get("sha256"), "name": cfg.get("name"), "num_classes": cfg.get("num_classes"),
            "temperature": temperature, "calibration": meta.get(calibration.CALIBRATION_KEY),
            "params": sum(p.numel() for p in model.parameters()), "label_space": space.name,
            "label_space_fingerprint": space.fingerprint(), "preprocess": pre.to_dict(),
            "train_metrics": plain(meta.get("metrics", {})), "datasets": list(meta.get("datasets", [])),
            "data_crop": meta.get("data_crop", "none")}
    return model, space, pre, plain(info)


@torch.no_grad()
def _logits(model: torch.nn.Module, images_nhwc: torch.Tensor, pre: Preprocess, device: torch.device,
            prec: str) -> torch.Tensor:
    x = to_input(images_nhwc.to(device, non_blocking=True), pre)
    with precision.autocast(prec, device):  # type: ignore[arg-type]
        logits = model(x)
    return logits.float()


@torch.no_grad()
def log_probs(model: torch.nn.Module, images_nhwc: torch.Tensor, pre: Preprocess, device: torch.device,
               prec: str, *, temperature: float = 1.0, flip_map: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scored, plain) log-probabilities: scored with the model's temperature and, given the label
    space's ``flip_map``, flip-rule TTA (:mod:`signscale.tta`); plain is the network at T = 1."""
    logits = _logits(model, images_nhwc, pre, device, prec)
    plain = logits.log_softmax(1)
    scored = calibration.scale_logits(logits, temperature).log_softmax(1)
    if flip_map is not None:
        mirrored = _logits(model, tta.flip_images(images_nhwc), pre, device, prec)
        probs = tta.combine(scored.exp(), calibration.scale_logits(mirrored, temperature).softmax(1), flip_map)
        scored = probs.clamp(min=torch.finfo(probs.dtype).tiny).log()
    return scored, plain


@distributed.restores_threads
def evaluate(cfg: EvalConfig, *, loaded: LoadedModel | None = None) -> EvalReport:
    """Score ``cfg.model`` on ``cfg.data``; write the report to ``cfg.out`` (rank 0) when it is set.

    Runs alone or under torchrun: every rank reads its share and returns the same, fully reduced
    report; files are written by rank 0 before any rank returns. ``loaded``: ``cfg.model`` already
    read by :func:`read_model` (the gate scores one model on several sets and reads it once).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return _evaluate(cfg, loaded)


class _Scorer:
    """The model's (calibrated, optionally flip-TTA) log-probabilities, and which rows of a batch it
    can score: labels mapped into the model's ids, padding and classes the model lacks left out."""

    def __init__(self, model: torch.nn.Module, pre: Preprocess, device: torch.device, cfg: EvalConfig,
                 temperature: float, space: LabelSpace, lut: torch.Tensor) -> None:
        self.model, self.pre, self.device, self.cfg = model, pre, device, cfg
        self.temperature, self.lut = temperature, lut
        self.flip_map = torch.from_numpy(space.flip_map()) if cfg.tta else None

    def __call__(self, images_nhwc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return log_probs(self.model, images_nhwc, self.pre, self.device, self.cfg.precision,
                         temperature=self.temperature, flip_map=self.flip_map)

    def rows(self, b: dict[str, Any]) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """(labels in the model's ids, rows to score, real rows of classes the model lacks)."""
        mapped = self.lut[b["label"].long()]
        real, known = ~b["pad"].numpy(), (mapped >= 0).numpy()
        return mapped.clamp(min=0), real & known, real & ~known


def _evaluate(cfg: EvalConfig, loaded: LoadedModel | None) -> EvalReport:
    distributed.init()
    rank, world = distributed.rank(), distributed.world_size()
    device = distributed.device(cfg.device)
    model, space, pre, model_info = load_model(cfg.model, device, loaded)
    if cfg.crop == "auto":  # score a source the way the model's training data was packed
        cfg = dataclasses.replace(cfg, crop=model_info.get("data_crop", "none"))
    data = open_data(cfg, pre, rank, world, pin=device.type == "cuda")
    lut_np, mapping = label_map(data.label_space, space)
    pairs = cfg.pairs()
    tally = Tally(len(space), len(data.conditions), len(data.countries), len(pairs), len(data.source_names))
    scorer = _Scorer(model, pre, device, cfg, model_info["temperature"], space, torch.from_numpy(lut_np))
    show = cfg.progress and rank == 0
    _clean_pass(data, tally, scorer, show)
    _corruption_pass(data, tally, scorer, pairs, cfg.batch_size, device, show)
    tally.reduce(device)
    metrics = _metrics(cfg, tally, model_info=model_info, data=data, space=space, mapping=mapping, pairs=pairs,
                       world=world, device=device)
    if metrics["overall"]["count"] == 0:
        skipped = metrics["skipped"]
        raise EvalError(f"{cfg.data}: no sample could be scored; {skipped['total']} skipped by reason: "
                        f"{skipped['by_reason']}" + (f", e.g. {skipped['examples'][0]}" if skipped["examples"] else ""))
    report = EvalReport(metrics=metrics,
                        example_images=[[e[2] for e in tally.examples.get((c["true_id"], c["predicted_id"]), [])]
                                        for c in metrics["top_confusions"]],
                        class_images={c: img for c, (_, img) in sorted(tally.prototypes.items())})
    if cfg.out and rank == 0:
        from signscale.evaluation import report_html

        report.files = report_html.write_report(cfg.out, metrics, example_images=report.example_images,
                                                class_images=report.class_images)
    distributed.barrier()
    return report


def _clean_pass(data: Any, tally: Tally, scorer: _Scorer, show: bool) -> None:
    """Every sample once, as it is: the tally's sums, examples and skips."""
    from signscale.progress import progress_bar

    started = time.perf_counter()
    with progress_bar("evaluate", data.batches, enabled=show, unit="batches") as advance:
        for b in data.loader([]):
            tally.add_skips(b.get("skips", ()))
            labels, keep, unknown = scorer.rows(b)
            tally.unmapped.update(b["label"].numpy()[unknown].tolist())
            if keep.any():
                logp, plain = scorer(b["image"])
                meta = {k: b[k].numpy() for k in ("condition", "country", "source")}
                tally.add(logp, labels, ids=b["id"].numpy(), keep=keep, images=b["image"].numpy(), meta=meta,
                          keys=b.get("keys"), logp_raw=plain)
            advance(1)
    tally.seconds = time.perf_counter() - started


def _corruption_pass(data: Any, tally: Tally, scorer: _Scorer, pairs: list[tuple[str, int]], batch_size: int,
                     device: torch.device, show: bool) -> None:
    """Accuracy under every corruption x severity, in passes that keep a batch's copies in budget."""
    from signscale.progress import progress_bar

    started = time.perf_counter()
    for group in pair_groups(pairs, batch_size, data.image_size):
        with progress_bar(f"corruptions {group[0] + 1}-{group[-1] + 1}/{len(pairs)}", data.batches, enabled=show,
                          unit="batches") as advance:
            for b in data.loader([pairs[i] for i in group]):
                labels, keep, _ = scorer.rows(b)
                if keep.any():
                    sel = torch.from_numpy(keep)
                    y = labels[sel].to(device)
                    light = brightness_bins(b["image"][sel].numpy())
                    for variant, i in zip(b["variants"], group):
                        hits = (scorer(variant[sel])[0].argmax(1) == y).cpu().numpy()
                        tally.corrupted[i] += (len(hits), int(hits.sum()))
                        tally.light_corrupted[i] += bin_counts(light, hits)
                advance(1)
    tally.corruption_seconds = time.perf_counter() - started


