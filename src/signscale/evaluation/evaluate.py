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
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from signscale import __version__, calibration, images, storage, tta
from signscale import config as config_mod
from signscale.corruptions import KINDS, SEVERITIES, apply_corruption
from signscale.labels import COUNTRIES, LabelError, LabelSpace
from signscale.models import rebuild
from signscale.training import checkpoint, distributed, precision
from signscale.transforms import Preprocess, to_input

__all__ = [
    "EVAL_FORMAT",
    "EVAL_VERSION",
    "CalibrateConfig",
    "CompareError",
    "Comparison",
    "Difference",
    "EvalConfig",
    "EvalError",
    "EvalReport",
    "calibrate",
    "compare",
    "confusion_matrix",
    "corrupt_batch",
    "evaluate",
    "expected_calibration_error",
    "label_map",
    "load_metrics",
    "per_class",
    "reliability_sums",
    "risk_coverage",
    "score_predictions",
]

EVAL_FORMAT = "signscale.eval"
EVAL_VERSION = 1
ECE_BINS = 15
TOP_K = 5
# Selective prediction: the report's error when only the most confident 99% / 95% are answered
COVERAGES = (0.99, 0.95)
CURVE_POINTS = 100  # risk-coverage curve at coverage 1%, 2%, ..., 100%
EXAMPLES_PER_CONFUSION = 4  # images kept per (true, predicted) pair, chosen by _rank(id)
SKIP_EXAMPLES = 20  # skipped entries listed by name in the report
DEFAULT_DATA = "synthetic:?n=2000&seed=1000"  # a seed no default training set uses
# Corrupted copies travel from the loader workers with their batch; passes are split so that one
# batch's copies stay under this size (at 32 px and batch 512, 85 corruption x severity pairs fit: all 65 do).
VARIANT_BUDGET_BYTES = 128 << 20


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message names the model, the data and what to do."""


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
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
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
        try:
            precision.check(self.precision)
        except ValueError as exc:
            raise config_mod.ConfigError(str(exc)) from None
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


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """``m[t, p]`` = number of samples of true class ``t`` predicted as ``p`` (int64 [C, C])."""
    labels, preds = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    flat = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class support, predicted, tp, precision, recall and F1 from a confusion matrix.

    Undefined values are NaN: precision of a class never predicted, recall and F1 of a class with
    no samples. F1 is ``2 tp / (2 tp + fp + fn)``, which equals the harmonic mean of precision and
    recall where both exist and is 0 for a class with samples that is never predicted right.
    """
    cm = np.asarray(confusion, dtype=np.int64)
    tp = np.diag(cm)
    support, predicted = cm.sum(1), cm.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision_ = np.where(predicted > 0, tp / np.maximum(predicted, 1), np.nan)
        recall = np.where(support > 0, tp / np.maximum(support, 1), np.nan)
        denom = support + predicted  # 2 tp + fp + fn
        f1 = np.where(support > 0, 2 * tp / np.maximum(denom, 1), np.nan)
    return {"support": support, "predicted": predicted, "tp": tp, "precision": precision_, "recall": recall,
            "f1": f1}


def reliability_sums(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    """[bins, 3] float64: per equal-width confidence bin, (count, sum of confidence, number correct).

    Bin ``b`` holds confidences in ``(b / bins, (b + 1) / bins]`` (the first bin also takes 0), the
    convention of Guo et al. (2017). Sums, not means, so that ranks can add them; the confidence
    sum is accumulated in fixed point (:func:`_fixed`), so it does not depend on the order of addition.
    """
    return _unfixed(_reliability_fixed(confidence, correct, bins))


def _reliability_fixed(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    conf = np.asarray(confidence, dtype=np.float64)
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    out = np.zeros((bins, 3), dtype=np.int64)
    np.add.at(out[:, 0], idx, 1)
    np.add.at(out[:, 1], idx, _fixed(conf, CONF_SCALE))
    np.add.at(out[:, 2], idx, np.asarray(correct, dtype=np.int64))
    return out


# Float sums depend on the order of addition, so 2 ranks, or another batch size, would change the
# last digits of the ECE. Sums of per-sample values are kept as integers in these units instead:
# integer addition is exact in any order (confidence to 2^-32; an NLL term, capped at 100, to 2^-24).
CONF_SCALE = 2 ** 32
NLL_SCALE = 2 ** 24
NLL_CAP = 100.0


def _fixed(values: np.ndarray, scale: int) -> np.ndarray:
    return np.round(np.asarray(values, dtype=np.float64) * scale).astype(np.int64)


def _unfixed(sums: np.ndarray) -> np.ndarray:
    """[bins, 3] int64 (count, fixed-point confidence, correct) -> float64 values."""
    out = sums.astype(np.float64)
    out[:, 1] = sums[:, 1] / CONF_SCALE
    return out


def expected_calibration_error(sums: np.ndarray) -> float:
    """ECE = sum over bins of (bin count / N) * |accuracy in bin - mean confidence in bin|; NaN if N = 0."""
    count, conf, correct = np.asarray(sums, dtype=np.float64).T
    n = count.sum()
    if n == 0:
        return math.nan
    return float(np.abs(correct - conf).sum() / n)  # count * |correct/count - conf/count| = |correct - conf|


def risk_coverage(confidence: np.ndarray, correct: np.ndarray, *, coverages: Sequence[float] = COVERAGES,
                  points: int = CURVE_POINTS, order: np.ndarray | None = None) -> dict[str, Any]:
    """Selective prediction: the error among the samples a model is most sure of, at each coverage.

    At coverage ``c`` the ``ceil(c * N)`` most confident samples are answered and the rest refused;
    the *risk* is the error rate of the answered ones. Returns ``error_at`` (coverage -> risk),
    ``threshold_at`` (coverage -> the lowest confidence answered there: a ``--min-confidence`` that
    keeps that coverage on data like this), ``aurc`` (the area under the risk-coverage curve, the
    mean risk over every N) and ``curve``, ``points`` rows of (coverage, risk, threshold). ``order``
    (indices, most confident first) fixes how ties are broken; by default a stable sort.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    n = len(conf)
    if n == 0:
        return {"error_at": {c: math.nan for c in coverages}, "threshold_at": {c: math.nan for c in coverages},
                "aurc": math.nan, "curve": []}
    order = np.argsort(-conf, kind="stable") if order is None else np.asarray(order)
    errors = np.cumsum(~ok[order])  # errors among the k most confident, k = 1..n
    risk = errors / np.arange(1, n + 1)

    def kept(c: float) -> int:  # the 1e-9 keeps 0.95 * 100 from rounding up to 96
        return min(n, max(1, math.ceil(c * n - 1e-9)))

    at = {c: kept(c) for c in coverages}
    curve = [{"coverage": j / points, "risk": float(risk[kept(j / points) - 1]),
              "threshold": float(conf[order[kept(j / points) - 1]])} for j in range(1, points + 1)]
    return {"error_at": {c: float(risk[k - 1]) for c, k in at.items()},
            "threshold_at": {c: float(conf[order[k - 1]]) for c, k in at.items()},
            "aurc": float(risk.mean()), "curve": curve}


def score_predictions(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """The headline metrics of one set of predictions: for tests and notebooks.

    ``labels`` [N] class ids, ``probs`` [N, C] class probabilities. Returns ``top1``, ``top5``,
    ``macro_f1``, ``balanced_accuracy``, ``ece``, ``nll``, ``error_at_99_coverage``,
    ``error_at_95_coverage``, ``confusion`` and the :func:`per_class` arrays.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    tally = _Tally(probs.shape[1], 1, 1, 0)
    tally.add(torch.from_numpy(np.log(np.maximum(probs, 1e-300))), torch.from_numpy(labels),
              ids=np.arange(len(labels)), keep=np.ones(len(labels), dtype=bool), images=None, meta={})
    return {**_summary_numbers(tally), "confusion": tally.confusion, **per_class(tally.confusion)}


def _summary_numbers(t: _Tally) -> dict[str, float]:
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
        "ece_uncalibrated": expected_calibration_error(_unfixed(t.calibration_raw_fixed)),
        "nll_uncalibrated": float(t.nll_raw_fixed / NLL_SCALE / n) if n else math.nan,
    }


def label_map(data_space: LabelSpace, model_space: LabelSpace) -> tuple[np.ndarray, str]:
    """(lut, how): ``lut[data id]`` is the model's id for that class, or -1 where the model lacks it.

    Identical label spaces map by id. Otherwise a class maps to the model output that stands for
    the same (country, country id), which is exact for models trained on merged spaces; classes left
    over map by semantic key, so a German model is scored on Chinese data over the meanings both
    share (``speed_limit_60`` is the same sign whatever its design). Raises EvalError when no class
    maps at all.
    """
    if data_space.fingerprint() == model_space.fingerprint():
        return np.arange(len(data_space), dtype=np.int64), "identity"
    try:
        lut = model_space.map_from(data_space)
    except LabelError:
        lut = np.full(len(data_space), -1, dtype=np.int64)
    how = "by_country_id" if (lut >= 0).all() else "by_key"
    by_meaning: dict[str, int] = {}
    for i, c in enumerate(model_space.classes):
        by_meaning.setdefault(c.key, i)  # by design, one meaning has several outputs: the first stands for it
    for j in np.flatnonzero(lut < 0):
        lut[j] = by_meaning.get(data_space[int(j)].key, -1)
    if not (lut >= 0).any():
        raise EvalError(f"no class of the data's label space {data_space.name!r} ({len(data_space)} classes, e.g. "
                        f"{', '.join(data_space.keys[:3])}) is in the model's label space {model_space.name!r} "
                        f"({len(model_space)} classes): nothing to evaluate. Evaluate on data of the classes the "
                        f"model was trained on.")
    return lut, how


def cross_country_confusions(confusion: np.ndarray, space: LabelSpace, limit: int = 10) -> list[dict[str, Any]]:
    """Mistakes whose predicted class belongs to no country of the true class (e.g. a cn sign taken for
    a de-only sign): the errors a merged model makes because it knows other countries' designs."""
    if len(space.countries()) < 2:
        return []
    countries = [{m[0] for m in space.members_of(i)} for i in range(len(space))]
    rows = []
    for tr, pr in zip(*np.nonzero(confusion)):
        if tr != pr and not countries[tr] & countries[pr]:
            rows.append({"true": space.ident(space[tr]), "predicted": space.ident(space[pr]),
                         "true_countries": sorted(countries[tr]), "predicted_countries": sorted(countries[pr]),
                         "count": int(confusion[tr, pr])})
    return sorted(rows, key=lambda r: (-r["count"], r["true"], r["predicted"]))[:limit]


# ---------------------------------------------------------------------------------------------
# Corruptions


def corrupt_batch(images_nhwc: np.ndarray, ids: Sequence[int] | np.ndarray, *, corruption: str, severity: int,
                  seed: int) -> np.ndarray:
    """Corrupt each uint8 image with its own generator, seeded by (seed, corruption index, severity, id).

    One image at a time, on purpose: every corruption draws its randomness for the whole array it
    is given, so a batched call would make a sample's pixels depend on its neighbours.
    """
    k = KINDS.index(corruption)  # the weather kinds first, as before the camera faults were added
    out = np.empty_like(images_nhwc)
    for j, (img, i) in enumerate(zip(images_nhwc, np.asarray(ids, dtype=np.int64))):
        out[j] = apply_corruption(img, corruption, severity, np.random.default_rng([seed, k, severity, int(i)]))
    return out


def _with_variants(batch: dict[str, Any], pairs: Sequence[tuple[str, int]], seed: int) -> dict[str, Any]:
    """Attach ``variants`` [P, B, H, W, 3]: the batch under each (corruption, severity) pair."""
    if pairs:
        imgs, ids = batch["image"].numpy(), batch["id"].numpy()
        batch["variants"] = torch.from_numpy(np.stack([corrupt_batch(imgs, ids, corruption=c, severity=s, seed=seed)
                                                       for c, s in pairs]))
    return batch


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
            yield _with_variants({"image": b["image"], "label": b["label"], "id": b["id"], "pad": b["pad"],
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
        return _with_variants(batch, self.pairs, self.seed)

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


def _open_data(cfg: EvalConfig, pre: Preprocess, rank: int, world: int, pin: bool) -> _Data:
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
                                      remainder="pad", image_size=pre.size if encoded else 0),
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
    description = {"spec": cfg.data, "kind": "source", "name": source.kind, "id": f"source:{source.spec or cfg.data}",
                   "checksum": None, "version": None, "encoding": None, "image_shape": [pre.size, pre.size, 3],
                   "source": _plain(source.describe())}

    def loader(pairs: Sequence[tuple[str, int]]) -> DataLoader:
        ds = _SourceBatches(source, indices, batch_size=cfg.batch_size, size=pre.size, crop=cfg.crop, pairs=pairs,
                            seed=cfg.seed)
        return _dataloader(ds, cfg.workers, pin)

    return _Data("source", source.label_space, list(CONDITIONS), list(COUNTRIES), names, description, {}, pre.size,
                 loader, -(-len(indices) // cfg.batch_size))


# ---------------------------------------------------------------------------------------------
# The tally: everything the metrics need, as sums that ranks can add


def _rank(sample_id: int) -> int:
    """A fixed scramble of sample ids (Fibonacci hashing): which examples a report shows."""
    return (sample_id * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF


class _Tally:
    def __init__(self, num_classes: int, n_conditions: int, n_countries: int, n_pairs: int,
                 n_sources: int = 1) -> None:
        c = num_classes
        self.num_classes = c
        self.confusion = np.zeros((c, c), dtype=np.int64)
        self.top5 = 0
        self.calibration_fixed = np.zeros((ECE_BINS, 3), dtype=np.int64)  # see CONF_SCALE
        self.nll_fixed = 0  # NLL_SCALE units
        # the same before the model's temperature and TTA (ECE before/after calibration)
        self.calibration_raw_fixed = np.zeros((ECE_BINS, 3), dtype=np.int64)
        self.nll_raw_fixed = 0
        # per sample, for selective prediction (a ranking, so not a sum): top log-probability, right or
        # wrong, and the id that breaks ties the same way whatever the batching
        self.scores: list[np.ndarray] = []
        self.hits: list[np.ndarray] = []
        self.score_ids: list[np.ndarray] = []
        self.conditions = np.zeros((n_conditions, 2), dtype=np.int64)  # (count, correct)
        self.countries = np.zeros((n_countries, 2), dtype=np.int64)
        self.sources = np.zeros((n_sources, 2), dtype=np.int64)
        self.corrupted = np.zeros((n_pairs, 2), dtype=np.int64)
        self.skips: Counter[str] = Counter()
        self.skip_examples: list[tuple[str, str, str]] = []
        self.unmapped: Counter[int] = Counter()  # data class id -> samples the model cannot score
        # (true, pred) -> [(id, key, image)] of lowest _rank; class -> (id, image) of a correct sample
        self.examples: dict[tuple[int, int], list[tuple[int, str, np.ndarray]]] = {}
        self.prototypes: dict[int, tuple[int, np.ndarray]] = {}
        self.seconds = 0.0
        self.corruption_seconds = 0.0

    @property
    def calibration(self) -> np.ndarray:
        return _unfixed(self.calibration_fixed)

    def add(self, logp: torch.Tensor, labels: torch.Tensor, *, ids: np.ndarray, keep: np.ndarray,
            images: np.ndarray | None, meta: Mapping[str, np.ndarray], keys: Sequence[str] | None = None,
            logp_raw: torch.Tensor | None = None) -> None:
        """Add one batch of log-probabilities [B, C] for the rows ``keep`` (labels in the model's ids).

        ``logp`` is what is scored (with the model's temperature, and TTA when asked); ``logp_raw``
        the plain network at temperature 1, for the calibration's "before" (default: ``logp``).
        """
        if not keep.any():
            return
        rows = torch.from_numpy(np.flatnonzero(keep)).to(logp.device)
        logp = logp.index_select(0, rows).double()
        y = labels.to(logp.device).index_select(0, rows)
        conf, pred = logp.max(1)
        top = logp.topk(min(TOP_K, logp.shape[1]), dim=1).indices
        correct_t = pred == y
        self.top5 += int((top == y[:, None]).any(1).sum())
        nll = (-logp.gather(1, y[:, None])).clamp(max=NLL_CAP).cpu().numpy()
        self.nll_fixed += int(_fixed(nll, NLL_SCALE).sum())
        y_np, pred_np, ok = y.cpu().numpy(), pred.cpu().numpy(), correct_t.cpu().numpy()
        self.confusion += confusion_matrix(y_np, pred_np, self.num_classes)
        self.calibration_fixed += _reliability_fixed(conf.exp().cpu().numpy(), ok)
        raw = logp if logp_raw is None else logp_raw.index_select(0, rows.to(logp_raw.device)).double().to(logp.device)
        raw_conf, raw_pred = raw.max(1)
        self.nll_raw_fixed += int(_fixed((-raw.gather(1, y[:, None])).clamp(max=NLL_CAP).cpu().numpy(),
                                         NLL_SCALE).sum())
        self.calibration_raw_fixed += _reliability_fixed(raw_conf.exp().cpu().numpy(), (raw_pred == y).cpu().numpy())
        self.scores.append(conf.cpu().numpy())
        self.hits.append(ok.astype(bool))
        self.score_ids.append(np.asarray(ids, dtype=np.int64)[keep])
        for name, table in (("condition", self.conditions), ("country", self.countries), ("source", self.sources)):
            if name in meta:
                g = meta[name][keep]
                np.add.at(table[:, 0], g, 1)
                np.add.at(table[:, 1], g, ok.astype(np.int64))
        if images is not None:
            self._keep_examples(y_np, pred_np, ids[keep], images[keep], [keys[i] for i in np.flatnonzero(keep)]
                                if keys is not None else None)

    def _keep_examples(self, y: np.ndarray, pred: np.ndarray, ids: np.ndarray, imgs: np.ndarray,
                       keys: list[str] | None) -> None:
        """Keep, per confusion pair, the ids of lowest :func:`_rank`, and per class one correct sample.

        A rank that depends on the id alone makes the choice independent of batching and ranks; a
        scrambled one (not the smallest ids) spreads the examples over the data, where the smallest
        ids of GTSRB would be consecutive frames of a single track.
        """
        for j in np.flatnonzero(y != pred):
            pair, i = (int(y[j]), int(pred[j])), int(ids[j])
            kept = self.examples.setdefault(pair, [])
            if len(kept) < EXAMPLES_PER_CONFUSION or _rank(i) < _rank(kept[-1][0]):
                kept.append((i, keys[j] if keys else str(i), imgs[j].copy()))
                kept.sort(key=lambda e: _rank(e[0]))
                del kept[EXAMPLES_PER_CONFUSION:]
        for j in np.flatnonzero(y == pred):
            c, i = int(y[j]), int(ids[j])
            if c not in self.prototypes or _rank(i) < _rank(self.prototypes[c][0]):
                self.prototypes[c] = (i, imgs[j].copy())

    def selective(self) -> dict[str, Any]:
        """:func:`risk_coverage` of everything added, ties in confidence broken by sample id."""
        scores = np.concatenate(self.scores) if self.scores else np.zeros(0)
        hits = np.concatenate(self.hits) if self.hits else np.zeros(0, dtype=bool)
        ids = np.concatenate(self.score_ids) if self.score_ids else np.zeros(0, dtype=np.int64)
        # ranked on the log-probability: exp() rounds many confident rows to exactly 1.0
        return risk_coverage(np.exp(scores), hits, order=np.lexsort((ids, -scores)))

    def add_skips(self, skips: Iterable[tuple[str, str, str]]) -> None:
        for key, reason, detail in skips:
            self.skips[reason] += 1
            if len(self.skip_examples) < SKIP_EXAMPLES * 4:
                self.skip_examples.append((key, reason, detail))

    def reduce(self, device: torch.device) -> None:
        """Sum every rank's tally into every rank's (a no-op in a single process)."""
        if not distributed.is_initialized():
            return
        for name in ("confusion", "calibration_fixed", "calibration_raw_fixed", "conditions", "countries", "sources",
                     "corrupted"):
            t = distributed.all_reduce_sum(torch.from_numpy(getattr(self, name).copy()).to(device))
            setattr(self, name, t.cpu().numpy())
        scalars = distributed.all_reduce_sum(torch.tensor([self.top5, self.nll_fixed, self.nll_raw_fixed],
                                                          dtype=torch.int64, device=device)).cpu().tolist()
        self.top5, self.nll_fixed, self.nll_raw_fixed = scalars
        parts = distributed.all_gather_object({"scores": self.scores, "hits": self.hits, "score_ids": self.score_ids,
                                               "skips": self.skips, "skip_examples": self.skip_examples,
                                               "unmapped": self.unmapped, "examples": self.examples,
                                               "prototypes": self.prototypes, "seconds": self.seconds,
                                               "corruption_seconds": self.corruption_seconds})
        self.skips, self.unmapped = Counter(), Counter()
        self.skip_examples, self.examples, self.prototypes = [], {}, {}
        self.scores, self.hits, self.score_ids = [], [], []
        for p in parts:
            self.scores += p["scores"]
            self.hits += p["hits"]
            self.score_ids += p["score_ids"]
            self.skips.update(p["skips"])
            self.unmapped.update(p["unmapped"])
            self.skip_examples += p["skip_examples"]
            for pair, kept in p["examples"].items():
                self.examples[pair] = sorted(self.examples.get(pair, []) + kept,
                                             key=lambda e: _rank(e[0]))[:EXAMPLES_PER_CONFUSION]
            for c, proto in p["prototypes"].items():
                if c not in self.prototypes or _rank(proto[0]) < _rank(self.prototypes[c][0]):
                    self.prototypes[c] = proto
        # the slowest rank decides how long the evaluation took
        self.seconds = max(p["seconds"] for p in parts)
        self.corruption_seconds = max(p["corruption_seconds"] for p in parts)


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
        mca = f", mCA {_pct(rob['mca'])}" if rob else ""
        skip = ""
        if skipped:
            reasons = ", ".join(f"{k}={v}" for k, v in sorted(m["skipped"]["by_reason"].items()))
            skip = f" ({reasons})"
        temp = m["calibration"].get("temperature", 1.0)
        ece = (f"ECE {_fmt(o['ece'], '.4f')} (T={temp:.3g}; {_fmt(o.get('ece_uncalibrated'), '.4f')} at T=1)"
               if temp != 1.0 else f"ECE {_fmt(o['ece'], '.4f')}")
        sel = (f", error at 99%/95% coverage {_pct(o.get('error_at_99_coverage'))}/"
               f"{_pct(o.get('error_at_95_coverage'))}")
        return (f"top-1 {_pct(o['top1'])}, macro-F1 {_fmt(o['macro_f1'], '.4f')}, {ece}{sel}{mca} "
                f"on {o['count']:,} images at {m['run']['images_per_s']:,.0f} images/s; {skipped:,} skipped{skip}"
                + (f"; report: {self.files['report']}" if "report" in self.files else ""))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.metrics, indent=indent, allow_nan=False)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _num(x: Any) -> Any:
    """JSON has no NaN: undefined numbers are null."""
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def _plain(obj: Any) -> Any:
    """Plain JSON data (tuples -> lists, numpy scalars -> Python, NaN -> null)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    return _num(obj)


def _groups(table: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {name: {"count": int(n), "correct": int(k), "accuracy": _num(k / n)}
            for name, (n, k) in zip(names, table.tolist()) if n > 0}


def _metrics(cfg: EvalConfig, t: _Tally, *, model_info: dict[str, Any], data: _Data, space: LabelSpace,
             mapping: str, pairs: list[tuple[str, int]], world: int, device: torch.device) -> dict[str, Any]:
    pc = per_class(t.confusion)
    head = _summary_numbers(t)
    keys = space.keys
    classes = [{"id": i, "key": keys[i], "name": space.names[i], "support": int(pc["support"][i]),
                "predicted": int(pc["predicted"][i]), "tp": int(pc["tp"][i]), "precision": _num(pc["precision"][i]),
                "recall": _num(pc["recall"][i]), "f1": _num(pc["f1"][i])} for i in range(len(space))]
    off = t.confusion.copy()
    np.fill_diagonal(off, 0)
    order = sorted(zip(*np.nonzero(off)), key=lambda p: (-off[p], p[0], p[1]))[:cfg.examples]
    top = []
    for tr, pr in order:
        kept = t.examples.get((int(tr), int(pr)), [])
        top.append({"true": keys[tr], "predicted": keys[pr], "true_id": int(tr), "predicted_id": int(pr),
                    "count": int(off[tr, pr]), "rate": _num(off[tr, pr] / max(1, pc["support"][tr])),
                    "examples": [e[0] for e in kept], "example_keys": [e[1] for e in kept]})
    def reliability(sums: np.ndarray) -> list[dict[str, Any]]:
        return [{"lo": b / ECE_BINS, "hi": (b + 1) / ECE_BINS, "count": int(n),
                 "confidence": _num(c / n) if n else None, "accuracy": _num(k / n) if n else None}
                for b, (n, c, k) in enumerate(sums.tolist())]

    bins = reliability(t.calibration)
    sel = t.selective()
    robustness = None
    if pairs:
        results = [{"corruption": c, "severity": s, "count": int(n), "correct": int(k), "accuracy": _num(k / n)
                    if n else None} for (c, s), (n, k) in zip(pairs, t.corrupted.tolist())]
        accs = [r["accuracy"] for r in results if r["accuracy"] is not None]
        mca = float(np.mean(accs)) if accs else math.nan
        kinds = list(dict.fromkeys(c for c, _ in pairs))
        sevs = sorted({s for _, s in pairs})

        def mean_of(rows: list[dict[str, Any]]) -> float | None:
            vals = [r["accuracy"] for r in rows if r["accuracy"] is not None]
            return float(np.mean(vals)) if vals else None

        robustness = {
            "seed": cfg.seed, "corruptions": kinds, "severities": sevs, "clean_top1": _num(head["top1"]),
            "results": results,
            "per_corruption": {c: mean_of([r for r in results if r["corruption"] == c]) for c in kinds},
            "per_severity": {str(s): mean_of([r for r in results if r["severity"] == s]) for s in sevs},
            "mca": _num(mca), "relative_mca": _num(mca / head["top1"]) if head["top1"] else None,
            "seconds": round(t.corruption_seconds, 3)}
    data_keys = data.label_space.keys
    unmapped = {data_keys[c]: int(n) for c, n in sorted(t.unmapped.items())}
    skips = Counter(t.skips)
    if unmapped:
        skips["label_not_in_model"] += sum(unmapped.values())
    skips.update(data.at_pack)
    examples = sorted(set(t.skip_examples), key=lambda e: (e[1], e[0]))[:SKIP_EXAMPLES]
    n_scored = head["count"]
    n_skipped = int(sum(skips.values()))
    return _plain({
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
        "overall": {k: _num(v) for k, v in head.items()},
        "classes": classes,
        "confusion": {"labels": keys, "matrix": t.confusion.tolist()},
        "calibration": {"bins": ECE_BINS, "ece": _num(head["ece"]), "reliability": bins,
                        "temperature": model_info.get("temperature", 1.0), "fitted": model_info.get("calibration"),
                        "tta": cfg.tta,
                        "uncalibrated": {"ece": _num(head["ece_uncalibrated"]), "nll": _num(head["nll_uncalibrated"]),
                                         "reliability": reliability(_unfixed(t.calibration_raw_fixed))}},
        "selective": {"coverages": list(COVERAGES),
                      "error_at": {str(c): sel["error_at"][c] for c in COVERAGES},
                      "threshold_at": {str(c): sel["threshold_at"][c] for c in COVERAGES},
                      "aurc": sel["aurc"], "curve": sel["curve"]},
        "conditions": _groups(t.conditions, data.conditions),
        "countries": _groups(t.countries, data.countries),
        "cross_country_confusions": cross_country_confusions(t.confusion, space),
        "sources": _groups(t.sources, data.source_names),
        "robustness": robustness,
        "top_confusions": top,
        "skipped": {"total": n_skipped, "by_reason": dict(sorted(skips.items())), "at_pack": dict(data.at_pack),
                    "classes_not_in_model": unmapped,
                    "examples": [{"key": k, "reason": r, "detail": d} for k, r, d in examples]},
    })


# ---------------------------------------------------------------------------------------------
# evaluate()


def _load_model(url: str, device: torch.device) -> tuple[torch.nn.Module, LabelSpace, Preprocess, dict[str, Any]]:
    try:
        state, meta = checkpoint.load_model_artefact(url)
    except FileNotFoundError as exc:
        raise EvalError(f"{url}: cannot read the model artefact ({exc})") from None
    model = rebuild(meta["model_config"])
    model.load_state_dict(state)
    model.to(device).eval()
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
            "train_metrics": _plain(meta.get("metrics", {})), "datasets": list(meta.get("datasets", [])),
            "data_crop": meta.get("data_crop", "none")}
    return model, space, pre, _plain(info)


@torch.no_grad()
def _logits(model: torch.nn.Module, images_nhwc: torch.Tensor, pre: Preprocess, device: torch.device,
            prec: str) -> torch.Tensor:
    x = to_input(images_nhwc.to(device, non_blocking=True), pre)
    with precision.autocast(prec, device):  # type: ignore[arg-type]
        logits = model(x)
    return logits.float()


@torch.no_grad()
def _log_probs(model: torch.nn.Module, images_nhwc: torch.Tensor, pre: Preprocess, device: torch.device,
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


def _pair_groups(pairs: list[tuple[str, int]], batch_size: int, image_size: int) -> list[list[int]]:
    """Pair indices per data pass, so one batch's corrupted copies stay within VARIANT_BUDGET_BYTES."""
    per_pass = max(1, VARIANT_BUDGET_BYTES // max(1, batch_size * image_size * image_size * 3))
    idx = list(range(len(pairs)))
    return [idx[i:i + per_pass] for i in range(0, len(idx), per_pass)]


@distributed.restores_threads
def evaluate(cfg: EvalConfig) -> EvalReport:
    """Score ``cfg.model`` on ``cfg.data``; write the report to ``cfg.out`` (rank 0) when it is set.

    Runs alone or under torchrun: every rank reads its share and returns the same, fully reduced
    report; files are written by rank 0 before any rank returns.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return _evaluate(cfg)


def _evaluate(cfg: EvalConfig) -> EvalReport:
    distributed.init()
    rank, world = distributed.rank(), distributed.world_size()
    device = distributed.device(cfg.device)
    model, space, pre, model_info = _load_model(cfg.model, device)
    if cfg.crop == "auto":  # score a source the way the model's training data was packed
        cfg = dataclasses.replace(cfg, crop=model_info.get("data_crop", "none"))
    data = _open_data(cfg, pre, rank, world, pin=device.type == "cuda")
    lut_np, mapping = label_map(data.label_space, space)
    lut = torch.from_numpy(lut_np)
    pairs = cfg.pairs()
    tally = _Tally(len(space), len(data.conditions), len(data.countries), len(pairs), len(data.source_names))
    from signscale.progress import progress_bar

    show = cfg.progress and rank == 0
    flip_map = torch.from_numpy(space.flip_map()) if cfg.tta else None

    def score(images_nhwc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _log_probs(model, images_nhwc, pre, device, cfg.precision, temperature=model_info["temperature"],
                          flip_map=flip_map)

    def rows(b: dict[str, Any]) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """(labels in the model's ids, rows to score, real rows of classes the model lacks)."""
        mapped = lut[b["label"].long()]
        real, known = ~b["pad"].numpy(), (mapped >= 0).numpy()
        return mapped.clamp(min=0), real & known, real & ~known

    started = time.perf_counter()
    with progress_bar("evaluate", data.batches, enabled=show, unit="batches") as advance:
        for b in data.loader([]):
            tally.add_skips(b.get("skips", ()))
            labels, keep, unknown = rows(b)
            tally.unmapped.update(b["label"].numpy()[unknown].tolist())
            if keep.any():
                logp, plain = score(b["image"])
                meta = {k: b[k].numpy() for k in ("condition", "country", "source")}
                tally.add(logp, labels, ids=b["id"].numpy(), keep=keep, images=b["image"].numpy(), meta=meta,
                          keys=b.get("keys"), logp_raw=plain)
            advance(1)
    tally.seconds = time.perf_counter() - started

    started = time.perf_counter()
    for group in _pair_groups(pairs, cfg.batch_size, data.image_size):
        with progress_bar(f"corruptions {group[0] + 1}-{group[-1] + 1}/{len(pairs)}", data.batches, enabled=show,
                          unit="batches") as advance:
            for b in data.loader([pairs[i] for i in group]):
                labels, keep, _ = rows(b)
                if keep.any():
                    sel = torch.from_numpy(keep)
                    y = labels[sel].to(device)
                    for variant, i in zip(b["variants"], group):
                        pred = score(variant[sel])[0].argmax(1)
                        tally.corrupted[i] += (int(keep.sum()), int((pred == y).sum()))
                advance(1)
    tally.corruption_seconds = time.perf_counter() - started

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


# ---------------------------------------------------------------------------------------------
# calibrate(): fit a model's temperature on held-out data


@dataclass(frozen=True)
class CalibrateConfig:
    """Which model to calibrate, on which held-out data (read as ``evaluate`` reads it)."""

    model: str  # model artefact folder; its model.json gains the fitted temperature
    data: str = DEFAULT_DATA  # held-out data: the validation split (never the training data), dataset or source
    batch_size: int = 512
    workers: int = 2
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    crop: Literal["auto", "none", "roi"] = "auto"
    threads: int = 0
    progress: bool = True
    write: bool = True  # False: fit and print, leave model.json as it is

    def __post_init__(self) -> None:
        # the shared fields are checked exactly as evaluate checks them
        self.eval_config()

    def eval_config(self) -> EvalConfig:
        return EvalConfig(model=self.model, data=self.data, batch_size=self.batch_size, workers=self.workers,
                          device=self.device, precision=self.precision, crop=self.crop, threads=self.threads,
                          progress=self.progress)


@dataclass(frozen=True)
class CalibrationResult:
    fit: calibration.TemperatureFit
    ece_before: float
    ece_after: float
    top1: float
    written: str  # the model.json that now holds the temperature ("" with write=False)

    def summary(self) -> str:
        where = f"; written to {self.written}" if self.written else "; not written (write=false)"
        return (f"{self.fit.summary()}, ECE {self.ece_before:.4f} -> {self.ece_after:.4f} (top-1 "
                f"{_pct(self.top1)}, unchanged){where}")


@distributed.restores_threads
def calibrate(cfg: CalibrateConfig) -> CalibrationResult:
    """Fit ``cfg.model``'s temperature on ``cfg.data`` and record it in its ``model.json``.

    One process; the data is read, cropped and resized exactly as :func:`evaluate` reads it. The
    fit starts from the plain network (T = 1) whatever temperature the model had, so calibrating
    again on other data replaces the old value rather than stacking on it.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ecfg = cfg.eval_config()
    device = distributed.device(cfg.device)
    model, space, pre, info = _load_model(cfg.model, device)
    if cfg.data.rstrip("/") in [str(d).rstrip("/") for d in info.get("datasets", [])]:
        raise EvalError(f"{cfg.data}: the model was trained on this data; a temperature fitted on it would make the "
                        "model over-confident. Give the held-out validation split (train's --val)")
    if ecfg.crop == "auto":
        ecfg = dataclasses.replace(ecfg, crop=info.get("data_crop", "none"))
    data = _open_data(ecfg, pre, 0, 1, pin=device.type == "cuda")
    lut = torch.from_numpy(label_map(data.label_space, space)[0])
    logps, labels = [], []
    from signscale.progress import progress_bar

    with progress_bar("calibrate", data.batches, enabled=cfg.progress, unit="batches") as advance:
        for b in data.loader([]):
            mapped = lut[b["label"].long()]
            keep = ~b["pad"] & (mapped >= 0)
            if keep.any():
                logps.append(_log_probs(model, b["image"][keep], pre, device, cfg.precision)[1].cpu())
                labels.append(mapped[keep])
            advance(1)
    if not logps:
        raise EvalError(f"{cfg.data}: no sample of a class the model knows; nothing to calibrate on")
    z, y = torch.cat(logps).double(), torch.cat(labels)
    try:
        fit = calibration.fit_temperature(z, y, data=cfg.data)
    except calibration.CalibrationError as exc:
        raise EvalError(f"{cfg.data}: {exc}") from None

    def ece(t: float) -> float:
        p = calibration.scale_logits(z, t).softmax(1)
        conf, pred = p.max(1)
        return expected_calibration_error(reliability_sums(conf.numpy(), (pred == y).numpy()))

    before, after = ece(1.0), ece(fit.temperature)
    top1 = float((z.argmax(1) == y).double().mean())
    written = ""
    if cfg.write:
        written = calibration.save_temperature(cfg.model, fit, {"ece_before": before, "ece_after": after})
    return CalibrationResult(fit=fit, ece_before=before, ece_after=after, top1=top1, written=written)


# ---------------------------------------------------------------------------------------------
# compare(): the promotion gate


class CompareError(ValueError):
    """Two reports that cannot be compared (different data, not signscale reports)."""


def load_metrics(src: Mapping[str, Any] | str) -> dict[str, Any]:
    """A metrics dict from itself, a ``metrics.json`` URL or a report folder holding one."""
    if isinstance(src, Mapping):
        metrics = dict(src)
        where = "metrics"
    else:
        where = src if src.endswith(".json") else storage.join(src, "metrics.json")
        if not storage.exists(where):
            raise CompareError(f"{where}: no such file; give a report folder written by `signscale evaluate --out` "
                               "or its metrics.json")
        metrics = storage.read_json(where)
    if metrics.get("format") != EVAL_FORMAT:
        raise CompareError(f"{where}: not a signscale evaluation report (format {metrics.get('format')!r})")
    if metrics.get("version") != EVAL_VERSION:
        raise CompareError(f"{where}: report version {metrics.get('version')!r} is not supported "
                           f"(this signscale reads {EVAL_VERSION}); re-run the evaluation")
    return metrics


@dataclass(frozen=True)
class Difference:
    """One metric in both reports. ``gates``: whether it can make B 'worse'."""

    metric: str  # e.g. top1, macro_f1, ece, class:stop, condition:snow, corruption:fog@3, mca
    a: float | None
    b: float | None
    support: int  # samples behind the smaller of the two values (0: unknown or none)
    higher_is_better: bool
    gates: bool
    tolerance: float

    @property
    def delta(self) -> float | None:
        return None if self.a is None or self.b is None else self.b - self.a

    def _beyond(self, sign: int) -> bool:
        """True when B moved in direction ``sign`` (+1: better) by strictly more than the tolerance."""
        d = self.delta
        if d is None:
            return False
        gain = d if self.higher_is_better else -d
        # 1e-12 absorbs float noise, so "exactly the tolerance" is never a regression
        return sign * gain > self.tolerance + 1e-12

    @property
    def worse(self) -> bool:
        return self.gates and self._beyond(-1)

    @property
    def better(self) -> bool:
        return self._beyond(+1)

    @property
    def regressed(self) -> bool:
        """Worse beyond tolerance, whether or not this metric gates (ECE never gates)."""
        return self._beyond(-1)


@dataclass(frozen=True)
class Comparison:
    """Every metric of report B against report A; ``worse`` is the promotion gate's verdict."""

    a_name: str
    b_name: str
    tolerance: float
    min_support: int
    differences: tuple[Difference, ...]
    notes: tuple[str, ...] = ()

    @property
    def worse(self) -> bool:
        """B is worse than A by more than the tolerance on a gating metric (docs/evaluation.md)."""
        return any(d.worse for d in self.differences)

    @property
    def regressions(self) -> list[Difference]:
        return [d for d in self.differences if d.worse]

    def lines(self, *, verbose: bool = False) -> list[str]:
        """A table for the terminal: the overall metrics, then every per-group metric that moved beyond
        the tolerance (all of them with ``verbose``), then the verdict."""
        out = [f"A: {self.a_name}", f"B: {self.b_name}",
               f"{'metric':<44} {'A':>9} {'B':>9} {'B-A':>9} {'n':>7}"]
        hidden = 0
        for d in self.differences:
            overall = ":" not in d.metric
            if not (verbose or overall or d.regressed or d.better):
                hidden += 1
                continue
            flag = "WORSE" if d.worse else ("worse (not gating)" if d.regressed else ("better" if d.better else ""))
            out.append(f"{d.metric:<44} {_cell(d.a, d.metric)} {_cell(d.b, d.metric)} {_delta(d.delta, d.metric)} "
                       f"{d.support or '':>7}  {flag}".rstrip())
        if hidden:
            out.append(f"({hidden} per-class/condition/corruption metrics within +-{self.tolerance:g}; --verbose "
                       "lists them)")
        out += [f"note: {n}" for n in self.notes]
        out.append(self.summary())
        return out

    def summary(self) -> str:
        regs = self.regressions
        if regs:
            names = ", ".join(d.metric for d in regs[:6]) + (", ..." if len(regs) > 6 else "")
            return f"WORSE: B is below A by more than {self.tolerance:g} on {len(regs)} metric(s): {names}"
        return f"OK: B is not worse than A beyond {self.tolerance:g} on any gating metric"

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a_name, "b": self.b_name, "tolerance": self.tolerance, "min_support": self.min_support,
                "worse": self.worse, "notes": list(self.notes),
                "differences": [{"metric": d.metric, "a": d.a, "b": d.b, "delta": d.delta, "support": d.support,
                                 "gates": d.gates, "worse": d.worse, "better": d.better} for d in self.differences]}


_NOT_PERCENT = ("macro_f1", "ece", "nll")  # scores, not shares of images: printed as plain numbers


def _cell(x: float | None, metric: str) -> str:
    if x is None:
        return f"{'-':>9}"
    return f"{x:>9.4f}" if metric in _NOT_PERCENT else f"{100 * x:>8.2f}%"


def _delta(x: float | None, metric: str) -> str:
    if x is None:
        return f"{'-':>9}"
    return f"{x:>+9.4f}" if metric in _NOT_PERCENT else f"{100 * x:>+8.2f}%"


def compare(a: Mapping[str, Any] | str, b: Mapping[str, Any] | str, *, tolerance: float = 0.005,
            min_support: int = 1, require_same_data: bool = True) -> Comparison:
    """Compare report B (the candidate) with report A (the reference); see docs/evaluation.md.

    Gating metrics, each "worse" when B is below A by strictly more than ``tolerance`` (absolute,
    0.005 = half a percentage point): overall top-1 and macro-F1; the recall of every class with at
    least ``min_support`` samples in both reports; the accuracy of every condition with that many
    samples; every corruption x severity accuracy and the mCA when both reports have them. ECE,
    top-5 and NLL are reported but do not gate. Reports of different data are refused unless
    ``require_same_data`` is False.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance: must be >= 0, got {tolerance}")
    ma, mb = load_metrics(a), load_metrics(b)
    notes: list[str] = []
    ida, idb = ma["data"].get("id"), mb["data"].get("id")
    if ida != idb:
        msg = f"the reports are of different data (A: {ma['data'].get('spec')}, B: {mb['data'].get('spec')})"
        if require_same_data:
            raise CompareError(msg + "; evaluate both models on the same data, or pass require_same_data=False")
        notes.append(msg)
    diffs: list[Difference] = []

    def add(metric: str, va: Any, vb: Any, support: int, *, higher: bool = True, gates: bool = True) -> None:
        diffs.append(Difference(metric, va, vb, support, higher, gates and support >= max(1, min_support), tolerance))

    oa, ob = ma["overall"], mb["overall"]
    n = min(oa["count"], ob["count"])
    add("top1", oa["top1"], ob["top1"], n)
    add("macro_f1", oa["macro_f1"], ob["macro_f1"], n)
    add("top5", oa["top5"], ob["top5"], n, gates=False)
    add("ece", oa["ece"], ob["ece"], n, higher=False, gates=False)
    ra, rb = ma.get("robustness"), mb.get("robustness")
    if ra and rb:
        add("mca", ra["mca"], rb["mca"], n)
    elif ra or rb:
        notes.append(f"only {'A' if ra else 'B'} has corruption results: robustness not compared")
    ca, cb = {c["key"]: c for c in ma["classes"]}, {c["key"]: c for c in mb["classes"]}
    for key in [k for k in ca if k in cb]:
        add(f"class:{key}", ca[key]["recall"], cb[key]["recall"], min(ca[key]["support"], cb[key]["support"]))
    only = sorted(set(ca) ^ set(cb))
    if only:
        notes.append(f"{len(only)} class(es) in one report only, not compared: {', '.join(only[:8])}"
                     + (", ..." if len(only) > 8 else ""))
    ga, gb = ma.get("conditions", {}), mb.get("conditions", {})
    for name in [k for k in ga if k in gb]:
        add(f"condition:{name}", ga[name]["accuracy"], gb[name]["accuracy"], min(ga[name]["count"], gb[name]["count"]))
    if ra and rb:
        res_a = {(r["corruption"], r["severity"]): r for r in ra["results"]}
        for r in rb["results"]:
            key = (r["corruption"], r["severity"])
            if key in res_a:
                add(f"corruption:{key[0]}@{key[1]}", res_a[key]["accuracy"], r["accuracy"],
                    min(res_a[key]["count"], r["count"]))
        if ra.get("seed") != rb.get("seed"):
            notes.append(f"corruption seeds differ (A: {ra.get('seed')}, B: {rb.get('seed')}): the corrupted "
                         "images are not the same")
    return Comparison(_report_name(a, ma), _report_name(b, mb), tolerance, min_support, tuple(diffs), tuple(notes))


def _report_name(src: Mapping[str, Any] | str, m: Mapping[str, Any]) -> str:
    model = m.get("model", {})
    sha = (model.get("sha256") or "")[:12]
    where = src if isinstance(src, str) else "metrics"
    return f"{where} (model {model.get('url', '?')}, sha256 {sha or '?'}, data {m['data'].get('spec')})"
