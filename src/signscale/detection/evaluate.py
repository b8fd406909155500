"""Scoring detection on scene datasets: ``evaluate_scenes(SceneEvalConfig) -> SceneEvalReport``.

Figures (all on the whole frame set, nothing sampled), for the clean frames and, with ``corruptions``,
for the same frames under each weather/sensor corruption of :mod:`signscale.corruptions`:

* **mAP@0.5** and **mAP@[.5:.95]**, class-agnostic ("sign": a box is a box whatever the detector or
  the classifier calls it), from torchmetrics' ``MeanAveragePrecision`` (COCO protocol, pycocotools
  back-end), over all detections above a low score threshold (0.05);
* at the operating threshold (``score_thresh``), with greedy IoU >= 0.5 matching by score:
  **recall per size bucket** (the box's longer side < 16, 16-32, 32-64, > 64 px, and the < 32 px
  aggregate the goals quote), **false alarms per frame**, and **end-to-end accuracy**: a ground-truth
  sign counts only if it is detected *and* the classifier names its fine class (43 GTSRB classes);
* the second stage's **rejections**: a detection flagged ``"rejected": True`` ("not a sign") is removed
  before scoring (a rejected false alarm is no longer one; a rejected true sign is a miss), and the
  report counts how many false alarms and how many true signs the rejection removed;
* **frames/s** of the whole two-stage pipeline (decode excluded) at the operating threshold.

The report folder (written by :mod:`signscale.detection.scene_report`) holds ``metrics.json``,
``report.html`` (misses and false alarms as enlarged crops in a grid, the weather table, then full-frame
overlays), ``overlays/*.png`` and ``false_alarms.json``: for hard-negative mining, every detection at or
above ``mine_thresh`` that overlaps no ground-truth box at IoU >= ``mine_iou``, per frame (format in
docs/detection.md).
"""

from __future__ import annotations

import inspect
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from signscale.corruptions import KINDS, SEVERITIES, apply_corruption
from signscale.data.scene_shards import is_scene_dataset, iter_scenes
from signscale.data.sources.scenes import is_scene_spec, open_scene_source
from signscale.detection.detect import DetectPipeline, FcosDetector, load_pipeline
from signscale.detection.matching import (
    SIZE_BUCKETS,
    SMALL_PX,
    boxes_and_scores,
    hard_negatives,
    is_rejected,
    score_frame,
    size_bucket,
)
from signscale.detection.scene_report import CLEAN, Evidence, write_scene_report
from signscale.progress import progress_bar
from signscale.training import distributed

__all__ = [
    "SceneEvalConfig",
    "SceneEvalReport",
    "evaluate_scenes",
    "is_scene_dataset",
]

# Operating thresholds scored side by side, so the threshold a deployment uses is chosen on validation
# (recall against false alarms per frame) instead of guessed.
SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class SceneEvalError(ValueError):
    """Scene evaluation cannot run (missing model, wrong data); the message says what to do."""


@dataclass(frozen=True)
class SceneEvalConfig:
    detector: str  # detector model folder
    data: str  # packed scene dataset URL, or a scene source spec (gtsdb:..., scenes-synthetic:...)
    classifier: str = ""  # classifier model folder: enables end-to-end accuracy
    out: str = ""  # report folder ("": no files)
    score_thresh: float = 0.3  # operating point for recall, false alarms and end-to-end accuracy
    map_thresh: float = 0.05  # detections kept for mAP
    iou: float = 0.5
    margin: float = -1.0  # crop margin; < 0: what the classifier was trained for (see detect.load_pipeline)
    batch: int = 4
    limit: int = 0  # evaluate only the first N scenes (0: all)
    device: str = "cpu"
    threads: int = 0
    worst: int = 6  # full-frame overlays per kind
    crops: int = 48  # miss crops and false-alarm crops shown in the report, each
    corruptions: tuple[str, ...] = ()  # also score every frame under each of these (weather or camera faults; "all")
    severity: int = 3  # of the corruptions, 1..5
    progress: bool = True  # a progress bar over the frames on a terminal
    seed: int = 0  # the corruptions' randomness: frame i under corruption c depends on (seed, i, c) only
    mine_thresh: float = 0.2  # false_alarms.json: detections at or above this score ...
    mine_iou: float = 0.3  # ... that overlap no ground-truth box at this IoU
    speed_frames: int = 32  # clean frames timed again at the operating threshold (0: time the evaluation pass)

    def __post_init__(self) -> None:
        if isinstance(self.corruptions, str):  # "snow,fog" from a command line or a YAML file
            object.__setattr__(self, "corruptions", tuple(c for c in self.corruptions.split(",") if c.strip()))
        names = tuple(c.strip() for c in self.corruptions)
        if "all" in names:
            names = KINDS
        bad = [c for c in names if c not in KINDS]
        if bad:
            raise SceneEvalError(f"corruptions: {', '.join(bad)} unknown; valid: {', '.join(KINDS)} or all")
        object.__setattr__(self, "corruptions", tuple(dict.fromkeys(names)))
        if self.severity not in SEVERITIES:
            raise SceneEvalError(f"severity: {self.severity} is not one of {SEVERITIES}")
        if not 0 <= self.map_thresh <= self.score_thresh <= 1:
            raise SceneEvalError("need 0 <= map_thresh <= score_thresh <= 1")
        if not self.map_thresh <= self.mine_thresh <= 1:
            raise SceneEvalError(f"mine_thresh: {self.mine_thresh} must lie in map_thresh..1 ({self.map_thresh}..1): "
                                 "the pipeline returns nothing below map_thresh")
        for name in ("iou", "mine_iou"):
            if not 0 < getattr(self, name) < 1:
                raise SceneEvalError(f"{name}: {getattr(self, name)} is outside (0, 1)")
        for name in ("batch",):
            if getattr(self, name) < 1:
                raise SceneEvalError(f"{name}: must be at least 1")
        for name in ("crops", "worst", "speed_frames", "limit"):
            if getattr(self, name) < 0:
                raise SceneEvalError(f"{name}: must be 0 or more")


@dataclass
class SceneEvalReport:
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        m = self.metrics
        rec = ", ".join(f"{k} {_pct(v['recall'])} (n={v['count']})" for k, v in m["recall_by_size"].items())
        e2e = f", end-to-end {m['end_to_end_accuracy']:.1%}" if m.get("end_to_end_accuracy") is not None else ""
        rej = m["rejection"]
        rej_text = (f", rejection removed {rej['false_alarms_removed']} false alarm(s) and "
                    f"{rej['signs_removed']} true sign(s)" if rej["rejected"] else "")
        where = f"; report: {self.files['report']}" if "report" in self.files else ""
        lines = [(f"{m['scenes']} frames, {m['signs']} signs: mAP@0.5 {m['map_50']:.3f}, mAP@[.5:.95] {m['map']:.3f}, "
                 f"recall@{m['score_thresh']} {m['recall']:.1%} (< {SMALL_PX} px {_pct(m['recall_small']['recall'])}; "
                 f"{rec}){e2e}, {m['fp_per_image']:.2f} false alarms/frame{rej_text}, "
                 f"{m['frames_per_s']:.2f} frames/s ({m['device']}){where}")]
        if m.get("threshold_sweep"):
            lines.append("  by threshold: " + ", ".join(
                f"{r['score_thresh']:.1f}: recall {r['recall']:.1%}, {r['fp_per_image']:.2f} FA/frame"
                + (f", e2e {r['end_to_end_accuracy']:.1%}" if r["end_to_end_accuracy"] is not None else "")
                for r in m["threshold_sweep"]))
        for name, c in m.get("conditions", {}).items():
            if name != CLEAN:
                e = f", end-to-end {c['end_to_end_accuracy']:.1%}" if c.get("end_to_end_accuracy") is not None else ""
                lines.append(f"  {name} (severity {m['severity']}): mAP@0.5 {c['map_50']:.3f}, recall "
                             f"{c['recall']:.1%} (< {SMALL_PX} px {_pct(c['recall_small']['recall'])}){e}, "
                             f"{c['fp_per_image']:.2f} false alarms/frame")
        return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"  # None: no sign of that size


# ---------------------------------------------------------------------------------------------
# Data


def _scenes(data: str, limit: int) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    """(key, image, meta) from a packed scene dataset or a scene source spec."""
    from signscale import images

    n = 0
    if is_scene_spec(data):
        src = open_scene_source(data)
        for i in range(len(src)):
            s = src.read(i)
            if not hasattr(s, "meta"):
                continue  # a Problem: counted by the source's own report
            arr = s.image if isinstance(s.image, np.ndarray) else images.decode(s.image)
            yield s.key, arr, s.meta
            n += 1
            if limit and n >= limit:
                return
    elif is_scene_dataset(data):
        for arr, extra in iter_scenes(data):
            yield str(extra.get("key", n)), arr, extra
            n += 1
            if limit and n >= limit:
                return
    else:
        raise SceneEvalError(f"{data}: neither a packed scene dataset nor a scene source spec "
                             "(scenes-synthetic:, gtsdb:, yolo:, coco:)")


def corrupt_frame(image: np.ndarray, boxes: np.ndarray, kind: str, severity: int, *, seed: int, index: int
                  ) -> np.ndarray:
    """Frame ``index`` under one corruption, sized by the signs in view as ``scenes-synthetic:`` sizes its
    weather (their median height over 32 px; 1 without signs), so a blur or a flake is as large on each
    sign as on a 32 px crop of that severity. Depends only on (seed, index, kind): any batch, any order."""
    from signscale.data.sources.scenes import _weather_scale  # the one rule for scene weather size

    rng = np.random.default_rng([seed, index, KINDS.index(kind), 2026])  # faults after weather: old seeds hold
    return apply_corruption(image, kind, severity, rng, scale=_weather_scale(np.asarray(boxes).tolist()))


# ---------------------------------------------------------------------------------------------
# Evaluation


class _Tally:
    """The counts of one condition (the clean frames, or all frames under one corruption)."""

    def __init__(self, metric_cls: Any, mode: str) -> None:
        self.map = metric_cls(box_format="xyxy", iou_type="bbox", backend="pycocotools")
        self.map_category = metric_cls(box_format="xyxy", iou_type="bbox", backend="pycocotools") \
            if mode == "category" else None
        self.mode = mode
        self.buckets = {name: [0, 0] for name, _, _ in SIZE_BUCKETS}
        self.small = [0, 0]
        self.frames = self.signs = self.hits = self.correct = self.false_alarms = 0
        self.hits_all = self.false_alarms_all = self.rejected = 0
        self.sweep = {t: [0, 0, 0] for t in SWEEP}  # threshold -> [hits, correct, false alarms]

    def add(self, truth: np.ndarray, labels: np.ndarray, dets: list[dict[str, Any]], *, truth_keys: list[str],
            score_thresh: float, iou: float, named: bool) -> dict[str, Any]:
        from signscale.detection.detector import detector_labels
        from signscale.labels import LabelSpace

        shown = [d for d in dets if not is_rejected(d)]
        pb, ps = boxes_and_scores(shown)
        ones = torch.ones(len(shown), dtype=torch.int64)
        self.map.update([{"boxes": torch.from_numpy(pb), "scores": torch.from_numpy(ps), "labels": ones}],
                        [{"boxes": torch.from_numpy(truth), "labels": torch.ones(len(truth), dtype=torch.int64)}])
        if self.map_category is not None:
            pl = torch.as_tensor([_det_label(d) for d in shown], dtype=torch.int64)
            tl = detector_labels(torch.from_numpy(labels), "category", LabelSpace.for_country("de"))
            self.map_category.update([{"boxes": torch.from_numpy(pb), "scores": torch.from_numpy(ps), "labels": pl}],
                                     [{"boxes": torch.from_numpy(truth), "labels": tl}])
        r = score_frame(truth, dets, score_thresh=score_thresh, iou=iou)
        for k, j in enumerate(r["match"]):
            found = int(j >= 0)
            counts = self.buckets[size_bucket(truth[k])]
            counts[0] += found
            counts[1] += 1
            if max(truth[k][2] - truth[k][0], truth[k][3] - truth[k][1]) < SMALL_PX:
                self.small[0] += found
                self.small[1] += 1
            self.correct += int(found and named and dets[int(j)].get("key") == truth_keys[k])
        self.frames += 1
        self.signs += len(truth)
        self.hits += int((r["match"] >= 0).sum())
        self.false_alarms += len(r["false_alarms"])
        self.hits_all += r["hits_all"]
        self.false_alarms_all += r["false_alarms_all"]
        self.rejected += r["rejected"]
        for t, counts in self.sweep.items():  # the same frame at other operating thresholds
            rt = score_frame(truth, dets, score_thresh=t, iou=iou)
            counts[0] += int((rt["match"] >= 0).sum())
            counts[1] += sum(int(named and j >= 0 and dets[int(j)].get("key") == truth_keys[k])
                             for k, j in enumerate(rt["match"]))
            counts[2] += len(rt["false_alarms"])
        return r

    def metrics(self, named: bool) -> dict[str, Any]:
        res = self.map.compute()
        rate = lambda a, b: (a / b) if b else None  # no sign of that size: no figure (and valid JSON)
        out = {
            "scenes": self.frames, "signs": self.signs,
            "map_50": float(res["map_50"]), "map": float(res["map"]), "map_small": float(res["map_small"]),
            "recall": self.hits / max(1, self.signs),
            "recall_by_size": {k: {"recall": rate(*v), "count": v[1]} for k, v in self.buckets.items()},
            "recall_small": {"recall": rate(*self.small), "count": self.small[1], "below_px": SMALL_PX},
            "fp_per_image": self.false_alarms / max(1, self.frames), "false_alarms": self.false_alarms,
            "end_to_end_accuracy": (self.correct / max(1, self.signs)) if named else None,
            "classification_accuracy_on_found": (self.correct / max(1, self.hits)) if named else None,
            "rejection": {"rejected": self.rejected, "false_alarms_removed": self.false_alarms_all - self.false_alarms,
                          "signs_removed": self.hits_all - self.hits,
                          "fp_per_image_without_rejection": self.false_alarms_all / max(1, self.frames)},
        }
        out["threshold_sweep"] = [
            {
                "score_thresh": t,
                "recall": h / max(1, self.signs),
                "fp_per_image": fa / max(1, self.frames),
                "end_to_end_accuracy": (c / max(1, self.signs)) if named else None,
            }
            for t, (h, c, fa) in self.sweep.items()
        ]
        if self.map_category is not None:
            cat = self.map_category.compute()
            out["map_50_category"], out["map_category"] = float(cat["map_50"]), float(cat["map"])
        return out


def _detect_all(pipeline: Any) -> Callable[[list[np.ndarray]], list[list[dict[str, Any]]]]:
    """``pipeline.detect`` asked to return the boxes its second stage rejects too (flagged ``rejected``),
    so the report can count what the rejection removed; a pipeline without that option returns all it has."""
    try:
        asks = "keep_rejected" in inspect.signature(pipeline.detect).parameters
    except (TypeError, ValueError):
        asks = False
    return (lambda ims: pipeline.detect(ims, keep_rejected=True)) if asks else pipeline.detect


@distributed.restores_threads
def evaluate_scenes(cfg: SceneEvalConfig, *, pipeline: Any = None) -> SceneEvalReport:
    """Score a detector (and a classifier) on a scene set; see the module docstring.

    ``pipeline``: anything with ``detect(images)`` (and optionally ``keep_rejected=``), a ``classifier``
    with a ``label_space`` and a ``detector``; by default the models named in ``cfg`` are loaded.
    """
    metric_cls = _map_metric()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    scored = _ScenePass(cfg, pipeline if pipeline is not None else _load(cfg), metric_cls)
    scored.run()
    report = SceneEvalReport(metrics=_scene_metrics(cfg, scored))
    if cfg.out:
        report.files = write_scene_report(cfg.out, report.metrics, scored.evidence, scored.mined, worst=cfg.worst)
    return report


def _map_metric() -> Any:
    """torchmetrics' ``MeanAveragePrecision``, checked before any model loads: it and its pycocotools
    back-end are an optional extra, and the error should say which."""
    try:
        import pycocotools  # noqa: F401 - the mAP back-end torchmetrics uses here
        from torchmetrics.detection import MeanAveragePrecision
    except ImportError as exc:
        raise SceneEvalError(f"scene evaluation needs torchmetrics and pycocotools ({exc}); "
                             "pip install 'signscale[detection]'") from None
    return MeanAveragePrecision


def _load(cfg: SceneEvalConfig) -> DetectPipeline:
    """The models ``cfg`` names, keeping every box down to ``map_thresh`` (mAP needs the low-score tail);
    without a classifier, a stand-in second stage so the detector alone is scored."""
    if cfg.classifier:
        return load_pipeline(cfg.detector, cfg.classifier, score_thresh=cfg.map_thresh,
                             margin=cfg.margin if cfg.margin >= 0 else None, device=cfg.device)
    det = FcosDetector.load(cfg.detector, score_thresh=cfg.map_thresh, device=cfg.device)
    return DetectPipeline(det, _NoClassifier(), detector_names=tuple(det.class_names))


class _ScenePass:
    """One pass over the frames, in batches: each batch detected clean and under every corruption, each
    frame tallied per condition; the clean frames also give the evidence and the hard negatives."""

    def __init__(self, cfg: SceneEvalConfig, pipeline: Any, metric_cls: Any) -> None:
        from signscale.labels import LabelSpace

        self.cfg, self.pipeline = cfg, pipeline
        self.mode = "sign" if list(getattr(pipeline.detector, "class_names", ["sign"])) == ["sign"] else "category"
        self.named = not isinstance(pipeline.classifier, _NoClassifier)
        self.detect = _detect_all(pipeline)
        self.space = LabelSpace.for_country("de")
        self.clf_space = pipeline.classifier.label_space
        self.conditions = (CLEAN, *cfg.corruptions)
        self.tallies = {c: _Tally(metric_cls, self.mode) for c in self.conditions}
        self.evidence = Evidence(cfg)
        self.mined: dict[str, list[list[float]]] = {}
        self.seconds = 0.0  # detecting the clean frames: frames/s of the evaluation pass
        self.timed: list[np.ndarray] = []  # clean frames timed again at the operating threshold
        self.sizes: Counter[str] = Counter()

    def run(self) -> None:
        """Read every frame once, keeping the first ``speed_frames`` for the timing at the operating point."""
        cfg = self.cfg
        batch: list[tuple[int, str, np.ndarray, dict[str, Any]]] = []
        with progress_bar("evaluate-scenes", cfg.limit or None, enabled=cfg.progress, unit="frames") as advance:
            for index, (key, arr, meta) in enumerate(_scenes(cfg.data, cfg.limit)):
                batch.append((index, key, arr, meta))
                self.sizes[f"{arr.shape[1]}x{arr.shape[0]}"] += 1
                if len(self.timed) < cfg.speed_frames:
                    self.timed.append(arr)
                if len(batch) >= cfg.batch:
                    advance(len(batch))
                    self._score(batch)
                    batch = []
            if batch:
                advance(len(batch))
                self._score(batch)
        if self.tallies[CLEAN].frames == 0:
            raise SceneEvalError(f"{cfg.data}: no scenes to evaluate")

    def _score(self, batch: list[tuple[int, str, np.ndarray, dict[str, Any]]]) -> None:
        """Detect the batch under each condition; only the clean pass is timed (frames/s of the eval pass)."""
        cfg = self.cfg
        for cond in self.conditions:
            frames = [b[2] if cond == CLEAN else corrupt_frame(b[2], b[3]["boxes"], cond, cfg.severity,
                                                                 seed=cfg.seed, index=b[0]) for b in batch]
            t = time.perf_counter()
            results = self.detect(frames)
            if cond == CLEAN:
                self.seconds += time.perf_counter() - t
            for (index, key, _, meta), arr, dets in zip(batch, frames, results):
                self._tally(cond, index, key, meta, arr, dets)

    def _tally(self, cond: str, index: int, key: str, meta: dict[str, Any], arr: np.ndarray,
               dets: list[dict[str, Any]]) -> None:
        """Score one frame's detections; a clean frame also feeds the mining and the report's evidence."""
        cfg = self.cfg
        truth = np.asarray(meta.get("boxes", []), np.float32).reshape(-1, 4)
        labels = np.asarray(meta.get("labels", []), np.int64)
        keys = [self.space[int(x)].key for x in labels]
        r = self.tallies[cond].add(truth, labels, dets, truth_keys=keys, score_thresh=cfg.score_thresh,
                                   iou=cfg.iou, named=self.named and self.clf_space is not None)
        if cond == CLEAN:
            self.mined[key] = hard_negatives(truth, dets, thresh=cfg.mine_thresh, iou=cfg.mine_iou)
            for d in dets:
                d["category"] = (self.clf_space[d["class_id"]].category
                                 if self.clf_space is not None and "class_id" in d else "")
            self.evidence.add(index, key, arr, truth, keys, dets, r)
        elif index == self.evidence.example_index:
            self.evidence.examples[cond] = arr


def _scene_metrics(cfg: SceneEvalConfig, scored: _ScenePass) -> dict[str, Any]:
    """metrics.json: the clean figures at the top level, every condition under ``conditions``, and what
    produced them (models, thresholds, seed, device), so a figure can be traced and reproduced."""
    frames = scored.tallies[CLEAN].frames
    per_cond = {c: scored.tallies[c].metrics(scored.named) for c in scored.conditions}
    fps_eval = frames / max(1e-9, scored.seconds)
    fps_op = _time_at_operating_point(scored.pipeline, scored.timed, cfg.score_thresh, cfg.batch)
    metrics: dict[str, Any] = {
        **per_cond[CLEAN], "score_thresh": cfg.score_thresh, "iou": cfg.iou, "map_thresh": cfg.map_thresh,
        "frames_per_s": fps_op if fps_op is not None else fps_eval,
        "frames_per_s_basis": (f"{len(scored.timed)} clean frames at the operating threshold {cfg.score_thresh}"
                               if fps_op is not None else f"the evaluation pass (all detections >= {cfg.map_thresh})"),
        "frames_per_s_eval_pass": fps_eval, "frame_sizes": dict(scored.sizes.most_common()),
        "device": _device_name(cfg.device), "threads": torch.get_num_threads(),
        "detector": cfg.detector, "classifier": cfg.classifier, "data": cfg.data,
        "detector_classes": scored.mode, "severity": cfg.severity, "seed": cfg.seed,
        "mine_thresh": cfg.mine_thresh, "mine_iou": cfg.mine_iou,
        "hard_negatives": sum(len(v) for v in scored.mined.values()),
        "conditions": per_cond,
    }
    metrics["scenes_per_s"] = metrics["frames_per_s"]  # the older name
    return metrics


def _time_at_operating_point(pipeline: Any, frames: list[np.ndarray], thresh: float, batch: int) -> float | None:
    """Frames/s of the whole pipeline as a user runs it: the detector at the operating threshold (the
    evaluation pass keeps every box down to 0.05 for mAP and classifies them all, which is slower), the
    production ``detect`` path. None when the detector's threshold cannot be set (a stand-in detector)."""
    model = getattr(pipeline.detector, "model", None)
    if not frames or model is None or not hasattr(model, "score_thresh"):
        return None
    old = model.score_thresh
    model.score_thresh = float(thresh)
    try:
        pipeline.detect(frames[:batch])  # warm-up: first-call allocations are not the steady state
        t = time.perf_counter()
        for start in range(0, len(frames), batch):
            pipeline.detect(frames[start:start + batch])
        return len(frames) / max(1e-9, time.perf_counter() - t)
    finally:
        model.score_thresh = old


class _NoClassifier:
    """Stands in for the second stage when only the detector is scored."""

    label_space = None

    def classify(self, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(len(crops), np.int64), np.zeros(len(crops), np.float32)


def _det_label(d: dict[str, Any]) -> int:
    from signscale.labels import CATEGORIES

    name = d.get("detector_class", "other")
    return CATEGORIES.index(name) + 1 if name in CATEGORIES else 1


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import os

    return f"CPU ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"
