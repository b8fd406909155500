"""The label-noise check: labels the model contradicts at high confidence, per batch and per vehicle.

A fleet's labels are only as good as the vehicles (or people) that supply them; a vehicle with a broken
labeller can poison a training set without lowering any single figure much. The check runs on each
ingested batch with the production model's predictions and is judged by ``max_noise`` (ingest) or the
gate's ``max_label_noise`` (the continual loop). It is only estimated in conditions the model is
reliable in (``IngestConfig.noise_conditions``): on a first snow batch the model is confidently wrong
for lack of data, not because the labels are.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from signscale.data.sources import CONDITIONS


def label_noise(labels: np.ndarray, pred: np.ndarray, conf: np.ndarray, vehicles: list[str], *,
                confidence: float, reliable: np.ndarray | None = None) -> dict[str, Any]:
    """Confident-learning style check: a label the model contradicts at high confidence is flagged.

    The rate is taken over the samples the model is confident about (``conf >= confidence``): there
    its predictions are almost always right, so the share of contradicted labels estimates the share
    of wrong labels, whatever the model's accuracy on the rest (a new condition such as snow lowers
    confidence, not the estimate). Returns the batch's rate, per-vehicle rates and the vehicles far
    above the rest of the fleet (at least 3 flags, a rate >= 20% and >= twice the others').
    """
    labelled = labels >= 0
    confident = labelled & (conf >= confidence)
    if reliable is not None:
        confident &= reliable  # only where the model has seen the condition (see IngestConfig.noise_conditions)
    flags = confident & (pred != labels)
    per: dict[str, dict[str, Any]] = {}
    for v, f, c, lab in zip(vehicles, flags, confident, labelled):
        if not lab:
            continue
        d = per.setdefault(v or "unknown", {"n": 0, "confident": 0, "flagged": 0})
        d["n"] += 1
        d["confident"] += int(c)
        d["flagged"] += int(f)
    total_c, total_f = int(confident.sum()), int(flags.sum())
    suspicious = []
    for v, d in per.items():
        d["rate"] = d["flagged"] / d["confident"] if d["confident"] else 0.0
        rest_c, rest_f = total_c - d["confident"], total_f - d["flagged"]
        rest_rate = rest_f / rest_c if rest_c else 0.0
        if d["flagged"] >= 3 and d["rate"] >= 0.2 and d["rate"] >= 2 * rest_rate:
            suspicious.append(v)
    return {"n": int(labelled.sum()), "confident": total_c, "flagged": total_f,
            "rate": total_f / total_c if total_c else 0.0, "confidence": confidence,
            "per_vehicle": dict(sorted(per.items())),
            "suspicious": sorted(suspicious, key=lambda v: -per[v]["rate"]), "flags": flags}


def flag_noise(records: np.ndarray, labelled: np.ndarray, pred: np.ndarray, conf: np.ndarray,
               good: list[dict[str, Any]], infos_kept: list[dict[str, Any]], *, confidence: float,
               conditions: tuple[str, ...]) -> dict[str, Any]:
    """A batch's label-noise figures (:func:`label_noise`) over its ``labelled`` records, counted only in
    ``conditions`` (empty: all); marks each kept info ``flagged`` or not, so ``records.jsonl`` says which
    labels the model contradicted. ``good`` holds the sidecar infos of ``records``, row for row."""
    reliable = None
    if conditions:
        trusted = [CONDITIONS.index(c) for c in conditions]  # IngestConfig refuses unknown names
        reliable = np.isin(records["condition"][labelled], trusted)
    noise = label_noise(records["label"][labelled], pred[labelled], conf[labelled],
                        [good[i]["vehicle"] for i in np.flatnonzero(labelled)], confidence=confidence,
                        reliable=reliable)
    flags = noise.pop("flags")
    flagged_ids = set(records["id"][labelled][flags].tolist())
    for info in infos_kept:
        info["flagged"] = info["id"] in flagged_ids
    return noise
