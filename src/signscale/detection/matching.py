"""Matching detections to the truth of one frame: IoU, greedy matching by score, the size buckets
the real-road report counts by, and the hard negatives a frame gives for the next training round."""

from __future__ import annotations

from typing import Any

import numpy as np

# The box's longer side in px; real GTSDB frames at 816x480 hold mostly 16-32 px signs and a seventh under 16.
SIZE_BUCKETS = (("<16", 0, 16), ("16-32", 16, 32), ("32-64", 32, 64), (">64", 64, 10**9))


SMALL_PX = 32  # the "signs under 32 px" aggregate of the goals and of older reports


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float32)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-9)


def match_boxes(pred: np.ndarray, scores: np.ndarray, truth: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """For each true box, the index of the prediction matched to it (-1: missed); greedy by score."""
    out = np.full(len(truth), -1, np.int64)
    if len(pred) == 0 or len(truth) == 0:
        return out
    ious = box_iou(pred, truth)
    for p in np.argsort(-scores, kind="stable"):
        cand = np.where(out == -1, ious[p], -1.0)
        t = int(np.argmax(cand))
        if cand[t] >= iou:
            out[t] = p
    return out


def size_bucket(box: np.ndarray | list[float]) -> str:
    side = max(box[2] - box[0], box[3] - box[1])
    return next(name for name, lo, hi in SIZE_BUCKETS if lo <= side < hi)


def is_rejected(det: dict[str, Any]) -> bool:
    """The second stage called this box "not a sign": scored as if the pipeline had not returned it."""
    return bool(det.get("rejected", False))


def boxes_and_scores(dets: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray([d["box"] for d in dets], np.float32).reshape(-1, 4),
            np.asarray([d["score"] for d in dets], np.float32))


def score_frame(truth: np.ndarray, dets: list[dict[str, Any]], *, score_thresh: float, iou: float = 0.5
                ) -> dict[str, Any]:
    """One frame at the operating threshold, with and without the second stage's rejections.

    ``match[k]``: the index into ``dets`` of the detection that found true box ``k`` (-1: missed), over
    the detections the pipeline keeps (score >= ``score_thresh``, not rejected); ``false_alarms``: the
    kept detections that found no sign. ``*_all``: the same counted as if nothing were rejected, so the
    difference is what the rejection removed.
    """
    truth = np.asarray(truth, np.float32).reshape(-1, 4)
    pb, ps = boxes_and_scores(dets)
    above = np.nonzero(ps >= score_thresh)[0]
    kept = np.asarray([i for i in above if not is_rejected(dets[i])], np.int64)

    def run(idx: np.ndarray) -> tuple[np.ndarray, list[int]]:
        m = match_boxes(pb[idx], ps[idx], truth, iou)
        match = np.asarray([int(idx[j]) if j >= 0 else -1 for j in m], np.int64)
        found = set(match[match >= 0].tolist())
        return match, [int(i) for i in idx if int(i) not in found]

    match, false_alarms = run(kept)
    match_all, false_alarms_all = run(above)
    return {"match": match, "false_alarms": false_alarms, "hits_all": int((match_all >= 0).sum()),
            "false_alarms_all": len(false_alarms_all), "rejected": int(len(above) - len(kept))}


def hard_negatives(truth: np.ndarray, dets: list[dict[str, Any]], *, thresh: float, iou: float
                   ) -> list[list[float]]:
    """[x1, y1, x2, y2, score] of every detection at or above ``thresh`` overlapping no true box at ``iou``.

    Every detection counts, rejected by the second stage or not: the detector fired there, so it is a
    hard negative for the detector. A second box on a found sign overlaps it and is not a negative.
    """
    pb, ps = boxes_and_scores(dets)
    ious = box_iou(pb, np.asarray(truth, np.float32).reshape(-1, 4))
    best = ious.max(axis=1) if ious.shape[1] else np.zeros(len(pb), np.float32)
    return [[round(float(v), 1) for v in pb[i]] + [round(float(ps[i]), 4)]
            for i in np.argsort(-ps, kind="stable") if ps[i] >= thresh and best[i] < iou]
