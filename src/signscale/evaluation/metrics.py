"""Metric functions: plain numpy on labels and predictions, or on the integer sums they reduce to, so
any number of ranks and any batch size give the same digits."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from signscale.labels import LabelError, LabelSpace

EVAL_FORMAT = "signscale.eval"  # metrics.json
EVAL_VERSION = 1
NOT_PERCENT = ("macro_f1", "ece", "nll")  # scores, not shares of images: printed as plain numbers
ECE_BINS = 15


# Selective prediction: the report's error when only the most confident 99% / 95% are answered
COVERAGES = (0.99, 0.95)


CURVE_POINTS = 100  # risk-coverage curve at coverage 1%, 2%, ..., 100%


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
    return unfixed(reliability_fixed(confidence, correct, bins))


def reliability_fixed(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> np.ndarray:
    conf = np.asarray(confidence, dtype=np.float64)
    idx = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    out = np.zeros((bins, 3), dtype=np.int64)
    np.add.at(out[:, 0], idx, 1)
    np.add.at(out[:, 1], idx, fixed(conf, CONF_SCALE))
    np.add.at(out[:, 2], idx, np.asarray(correct, dtype=np.int64))
    return out


# Float sums depend on the order of addition, so 2 ranks, or another batch size, would change the
# last digits of the ECE. Sums of per-sample values are kept as integers in these units instead:
# integer addition is exact in any order (confidence to 2^-32; an NLL term, capped at 100, to 2^-24).
CONF_SCALE = 2 ** 32


NLL_SCALE = 2 ** 24


NLL_CAP = 100.0


def fixed(values: np.ndarray, scale: int) -> np.ndarray:
    return np.round(np.asarray(values, dtype=np.float64) * scale).astype(np.int64)


def unfixed(sums: np.ndarray) -> np.ndarray:
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


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message names the model, the data and what to do."""


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
