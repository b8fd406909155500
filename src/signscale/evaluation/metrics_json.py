"""The sections of ``metrics.json`` (docs/evaluation.md), one small function each, from the sums of a
:class:`~signscale.evaluation.tally.Tally`.

:func:`signscale.evaluation.evaluate.evaluate` assembles the document from these; keeping each
section apart lets a reader find where a key comes from, and keeps the runner about running.
Sections hold numpy values and NaN where a number is undefined; :func:`plain` turns the assembled
document into JSON data once, at the end.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from signscale.evaluation.metrics import COVERAGES, ECE_BINS, per_class, unfixed
from signscale.evaluation.robustness import BRIGHTNESS_EDGES
from signscale.evaluation.tally import SKIP_EXAMPLES, Tally
from signscale.labels import LabelSpace

# ---------------------------------------------------------------------------------------------
# JSON values


def number(x: Any) -> Any:
    """JSON has no NaN: undefined numbers are null."""
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def plain(obj: Any) -> Any:
    """Plain JSON data (tuples -> lists, numpy scalars -> Python, NaN -> null)."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return plain(obj.tolist())
    return number(obj)


# ---------------------------------------------------------------------------------------------
# Sections


def groups(table: np.ndarray, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """(count, correct) rows of a per-group table as ``{name: {count, correct, accuracy}}``, empty groups left out."""
    return {name: {"count": int(n), "correct": int(k), "accuracy": number(k / n)}
            for name, (n, k) in zip(names, table.tolist()) if n > 0}


def classes(confusion: np.ndarray, space: LabelSpace) -> list[dict[str, Any]]:
    """One row per class of the model's label space: support, predictions and the per-class scores."""
    pc, keys, names = per_class(confusion), space.keys, space.names
    return [{"id": i, "key": keys[i], "name": names[i], "support": int(pc["support"][i]),
             "predicted": int(pc["predicted"][i]), "tp": int(pc["tp"][i]), "precision": number(pc["precision"][i]),
             "recall": number(pc["recall"][i]), "f1": number(pc["f1"][i])} for i in range(len(space))]


def top_confusions(t: Tally, keys: Sequence[str], limit: int) -> list[dict[str, Any]]:
    """The ``limit`` most frequent (true, predicted) mistakes, ties by class ids, with their kept examples."""
    off = t.confusion.copy()
    np.fill_diagonal(off, 0)
    support = per_class(t.confusion)["support"]
    order = sorted(zip(*np.nonzero(off)), key=lambda p: (-off[p], p[0], p[1]))[:limit]
    top = []
    for tr, pr in order:
        kept = t.examples.get((int(tr), int(pr)), [])
        top.append({"true": keys[tr], "predicted": keys[pr], "true_id": int(tr), "predicted_id": int(pr),
                    "count": int(off[tr, pr]), "rate": number(off[tr, pr] / max(1, support[tr])),
                    "examples": [e[0] for e in kept], "example_keys": [e[1] for e in kept]})
    return top


def reliability(sums: np.ndarray) -> list[dict[str, Any]]:
    """The reliability diagram's bins from per-bin (count, confidence sum, correct) sums."""
    return [{"lo": b / ECE_BINS, "hi": (b + 1) / ECE_BINS, "count": int(n),
             "confidence": number(c / n) if n else None, "accuracy": number(k / n) if n else None}
            for b, (n, c, k) in enumerate(sums.tolist())]


def calibration(t: Tally, head: Mapping[str, Any], model_info: Mapping[str, Any], tta: bool) -> dict[str, Any]:
    """ECE and reliability as scored (temperature, TTA) and of the plain network, with the temperature used."""
    return {"bins": ECE_BINS, "ece": number(head["ece"]), "reliability": reliability(t.calibration),
            "temperature": model_info.get("temperature", 1.0), "fitted": model_info.get("calibration"),
            "tta": tta,
            "uncalibrated": {"ece": number(head["ece_uncalibrated"]), "nll": number(head["nll_uncalibrated"]),
                             "reliability": reliability(unfixed(t.calibration_raw_fixed))}}


def selective(t: Tally) -> dict[str, Any]:
    """Selective prediction: error and confidence threshold at each reported coverage, AURC and the curve."""
    sel = t.selective()
    return {"coverages": list(COVERAGES),
            "error_at": {str(c): sel["error_at"][c] for c in COVERAGES},
            "threshold_at": {str(c): sel["threshold_at"][c] for c in COVERAGES},
            "aurc": sel["aurc"], "curve": sel["curve"]}


def _mean_accuracy(rows: list[dict[str, Any]]) -> float | None:
    vals = [r["accuracy"] for r in rows if r["accuracy"] is not None]
    return float(np.mean(vals)) if vals else None


def robustness(t: Tally, pairs: Sequence[tuple[str, int]], seed: int, clean_top1: float) -> dict[str, Any] | None:
    """Accuracy per (corruption, severity), the means per corruption and severity, and mCA (None: no corruptions)."""
    if not pairs:
        return None
    results = [{"corruption": c, "severity": s, "count": int(n), "correct": int(k), "accuracy": number(k / n)
                if n else None} for (c, s), (n, k) in zip(pairs, t.corrupted.tolist())]
    accs = [r["accuracy"] for r in results if r["accuracy"] is not None]
    mca = float(np.mean(accs)) if accs else math.nan
    kinds = list(dict.fromkeys(c for c, _ in pairs))
    sevs = sorted({s for _, s in pairs})
    return {
        "seed": seed, "corruptions": kinds, "severities": sevs, "clean_top1": number(clean_top1),
        "results": results,
        "per_corruption": {c: _mean_accuracy([r for r in results if r["corruption"] == c]) for c in kinds},
        "per_severity": {str(s): _mean_accuracy([r for r in results if r["severity"] == s]) for s in sevs},
        "mca": number(mca), "relative_mca": number(mca / clean_top1) if clean_top1 else None,
        "by_brightness": by_brightness(t, pairs),
        "seconds": round(t.corruption_seconds, 3)}


def by_brightness(t: Tally, pairs: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """Accuracy clean and under each (corruption, severity), per bin of the clean image's mean brightness.

    The bins' image counts are the same in every row (each image gets every corruption), so they are
    given once; an empty bin's accuracies are None.
    """
    def accuracies(table: np.ndarray) -> list[float | None]:
        return [number(k / n) if n else None for n, k in table.tolist()]

    return {"edges": [0.0, *BRIGHTNESS_EDGES, 1.0], "count": t.light_clean[:, 0].tolist(),
            "clean": accuracies(t.light_clean),
            "results": [{"corruption": c, "severity": s, "accuracy": accuracies(table)}
                        for (c, s), table in zip(pairs, t.light_corrupted)]}


def skipped(t: Tally, data_space: LabelSpace, at_pack: Mapping[str, int]) -> dict[str, Any]:
    """Everything not scored, by reason: read or decode problems, classes the model lacks, and what
    ``pack`` quarantined, with a few examples."""
    keys = data_space.keys
    unmapped = {keys[c]: int(n) for c, n in sorted(t.unmapped.items())}
    skips = Counter(t.skips)
    if unmapped:
        skips["label_not_in_model"] += sum(unmapped.values())
    skips.update(at_pack)
    examples = sorted(set(t.skip_examples), key=lambda e: (e[1], e[0]))[:SKIP_EXAMPLES]
    return {"total": int(sum(skips.values())), "by_reason": dict(sorted(skips.items())), "at_pack": dict(at_pack),
            "classes_not_in_model": unmapped,
            "examples": [{"key": k, "reason": r, "detail": d} for k, r, d in examples]}
