"""Scoring detection on scene datasets: ``evaluate_scenes(SceneEvalConfig) -> SceneEvalReport``.

Figures (all on the whole scene set, nothing sampled):

* **mAP@0.5** and **mAP@[.5:.95]** of the detector stage, from torchmetrics' ``MeanAveragePrecision``
  (COCO protocol, pycocotools back-end), over all detections above a low score threshold (0.05), in the
  detector's own classes ("sign", or the four GTSDB categories);
* at the operating threshold (``score_thresh``), with greedy IoU >= 0.5 matching by score:
  **recall per size bucket** (the box's longer side < 32 px, 32-64, > 64), **false positives per
  image**, and **end-to-end accuracy**: a ground-truth sign counts only if it is detected *and* the
  classifier names its fine class (43 GTSRB classes) correctly;
* **scenes/s** of the whole two-stage pipeline (decode excluded), on this machine's CPU or GPU.

The report folder holds ``metrics.json``, ``report.html`` and ``overlays/*.png``: the scenes with
the most missed signs and the most false alarms, with ground truth (white; missed: magenta) and
detections (coloured by category, "FP" marks false alarms), enlarged so a person can check them.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from signscale import distributed, storage
from signscale.detect import DetectPipeline, FcosDetector, draw_detections, load_pipeline
from signscale.sources.scenes import is_scene_dataset, is_scene_spec, iter_scenes, open_scene_source

__all__ = [
    "SIZE_BUCKETS",
    "SceneEvalConfig",
    "SceneEvalReport",
    "demo_detection",
    "evaluate_scenes",
    "is_scene_dataset",
    "match_boxes",
]

SIZE_BUCKETS = (("<32", 0, 32), ("32-64", 32, 64), (">64", 64, 10**9))


class SceneEvalError(ValueError):
    """Scene evaluation cannot run (missing model, wrong data); the message says what to do."""


@dataclass(frozen=True)
class SceneEvalConfig:
    detector: str  # detector model folder
    data: str  # packed scene dataset URL, or a scene source spec (gtsdb:..., scenes-synthetic:...)
    classifier: str = ""  # classifier model folder: enables end-to-end accuracy
    out: str = ""  # report folder ("": no files)
    score_thresh: float = 0.3  # operating point for recall, false positives and end-to-end accuracy
    map_thresh: float = 0.05  # detections kept for mAP
    iou: float = 0.5
    margin: float = -1.0  # crop margin; < 0: what the classifier was trained for (see detect.load_pipeline)
    batch: int = 4
    limit: int = 0  # evaluate only the first N scenes (0: all)
    device: str = "cpu"
    threads: int = 0
    worst: int = 6  # overlays per kind

    def __post_init__(self) -> None:
        if not 0 <= self.map_thresh <= self.score_thresh <= 1:
            raise SceneEvalError("need 0 <= map_thresh <= score_thresh <= 1")
        if not 0 < self.iou < 1:
            raise SceneEvalError(f"iou: {self.iou} is outside (0, 1)")


@dataclass
class SceneEvalReport:
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        m = self.metrics
        rec = ", ".join(f"{k} {v['recall']:.1%} (n={v['count']})" for k, v in m["recall_by_size"].items())
        e2e = f", end-to-end {m['end_to_end_accuracy']:.1%}" if m.get("end_to_end_accuracy") is not None else ""
        where = f"; report: {self.files['report']}" if "report" in self.files else ""
        return (f"{m['scenes']} scenes, {m['signs']} signs: mAP@0.5 {m['map_50']:.3f}, mAP@[.5:.95] {m['map']:.3f}, "
                f"recall@{m['score_thresh']} {m['recall']:.1%} ({rec}){e2e}, {m['fp_per_image']:.2f} false "
                f"positives/image, {m['scenes_per_s']:.2f} scenes/s ({m['device']}){where}")


# ---------------------------------------------------------------------------------------------
# Matching


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


# ---------------------------------------------------------------------------------------------
# Evaluation


@distributed.restores_threads
def evaluate_scenes(cfg: SceneEvalConfig, *, pipeline: DetectPipeline | None = None) -> SceneEvalReport:
    """Score a detector (and a classifier) on a scene set; see the module docstring."""
    try:
        import pycocotools  # noqa: F401 - the mAP back-end torchmetrics uses here
        from torchmetrics.detection import MeanAveragePrecision
    except ImportError as exc:
        raise SceneEvalError(f"scene evaluation needs torchmetrics and pycocotools ({exc}); "
                             "pip install 'signscale[detection]'") from None

    from signscale.detector import detector_labels
    from signscale.labels import LabelSpace

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if pipeline is None:
        if cfg.classifier:
            pipeline = load_pipeline(cfg.detector, cfg.classifier, score_thresh=cfg.map_thresh,
                                     margin=cfg.margin if cfg.margin >= 0 else None, device=cfg.device)
        else:
            det = FcosDetector.load(cfg.detector, score_thresh=cfg.map_thresh, device=cfg.device)
            pipeline = DetectPipeline(det, _NoClassifier(), detector_names=tuple(det.class_names))
    mode = "sign" if list(getattr(pipeline.detector, "class_names", ["sign"])) == ["sign"] else "category"
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    space = LabelSpace.for_country("de")
    clf_space = pipeline.classifier.label_space
    counts = {name: [0, 0] for name, _, _ in SIZE_BUCKETS}
    signs = hits = correct = fps = scenes = 0
    seconds = 0.0
    per_scene: list[dict[str, Any]] = []
    keep_images: dict[str, np.ndarray] = {}
    batch: list[tuple[str, np.ndarray, dict[str, Any]]] = []

    def flush() -> None:
        nonlocal signs, hits, correct, fps, scenes, seconds
        t = time.perf_counter()
        results = pipeline.detect([b[1] for b in batch])
        seconds += time.perf_counter() - t
        for (key, arr, meta), dets in zip(batch, results):
            truth = np.asarray(meta.get("boxes", []), np.float32).reshape(-1, 4)
            labels = np.asarray(meta.get("labels", []), np.int64)
            pb = np.asarray([d["box"] for d in dets], np.float32).reshape(-1, 4)
            ps = np.asarray([d["score"] for d in dets], np.float32)
            pl = np.asarray([_det_label(d, mode) for d in dets], np.int64)
            metric.update([{"boxes": torch.from_numpy(pb), "scores": torch.from_numpy(ps), "labels": torch.from_numpy(pl)}],
                          [{"boxes": torch.from_numpy(truth),
                            "labels": detector_labels(torch.from_numpy(labels), mode, space)}])
            op = ps >= cfg.score_thresh
            idx = np.nonzero(op)[0]
            m = match_boxes(pb[idx], ps[idx], truth, cfg.iou)
            matched = {int(idx[j]) for j in m if j >= 0}
            missed = [k for k in range(len(truth)) if m[k] < 0]
            ok = 0
            for k, j in enumerate(m):
                bucket = size_bucket(truth[k])
                counts[bucket][1] += 1
                if j >= 0:
                    counts[bucket][0] += 1
                    d = dets[int(idx[j])]
                    ok += int(clf_space is not None and d.get("key") == space[int(labels[k])].key)
            n_fp = int(op.sum()) - len(matched)
            signs += len(truth)
            hits += len(truth) - len(missed)
            correct += ok
            fps += n_fp
            scenes += 1
            shown = [dict(d, tag="" if i in matched else "FP") for i, d in enumerate(dets) if op[i]]
            for d in shown:
                d["category"] = clf_space[d["class_id"]].category if clf_space is not None and "class_id" in d else ""
            per_scene.append({"key": key, "signs": len(truth), "missed": missed, "fp": n_fp, "detections": shown,
                              "truth": truth.tolist(), "truth_keys": [space[int(x)].key for x in labels]})
            if missed or n_fp:  # only scenes that can appear among the worst are kept for overlays
                keep_images[key] = arr
        batch.clear()

    for item in _scenes(cfg.data, cfg.limit):
        batch.append(item)
        if len(batch) >= cfg.batch:
            flush()
    if batch:
        flush()
    if scenes == 0:
        raise SceneEvalError(f"{cfg.data}: no scenes to evaluate")
    res = metric.compute()
    metrics: dict[str, Any] = {
        "scenes": scenes, "signs": signs, "score_thresh": cfg.score_thresh, "iou": cfg.iou,
        "map_50": float(res["map_50"]), "map": float(res["map"]), "map_small": float(res["map_small"]),
        "recall": hits / max(1, signs),
        "recall_by_size": {k: {"recall": (v[0] / v[1]) if v[1] else float("nan"), "count": v[1]}
                           for k, v in counts.items()},
        "end_to_end_accuracy": (correct / max(1, signs)) if not isinstance(pipeline.classifier, _NoClassifier) else None,
        "classification_accuracy_on_found": (correct / max(1, hits)) if not isinstance(pipeline.classifier,
                                                                                        _NoClassifier) else None,
        "fp_per_image": fps / scenes, "scenes_per_s": scenes / max(1e-9, seconds),
        "device": _device_name(cfg.device), "threads": torch.get_num_threads(),
        "detector": cfg.detector, "classifier": cfg.classifier, "data": cfg.data,
        "detector_classes": mode,
    }
    report = SceneEvalReport(metrics=metrics)
    if cfg.out:
        report.files = write_scene_report(cfg.out, metrics, per_scene, keep_images, worst=cfg.worst)
    return report


class _NoClassifier:
    """Stands in for the second stage when only the detector is scored."""

    label_space = None

    def classify(self, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(len(crops), np.int64), np.zeros(len(crops), np.float32)


def _det_label(d: dict[str, Any], mode: str) -> int:
    if mode == "sign":
        return 1
    from signscale.labels import CATEGORIES

    name = d.get("detector_class", "other")
    return CATEGORIES.index(name) + 1 if name in CATEGORIES else 1


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import os

    return f"CPU ({torch.get_num_threads()} threads, {os.cpu_count()} cores)"


# ---------------------------------------------------------------------------------------------
# Report


def write_scene_report(out: str, metrics: dict[str, Any], per_scene: list[dict[str, Any]],
                       kept: dict[str, np.ndarray], *, worst: int = 6) -> dict[str, str]:
    """``metrics.json``, ``overlays/*.png`` (worst misses, worst false alarms) and ``report.html``."""
    import base64

    from signscale import images

    storage.makedirs(out)
    storage.write_json(storage.join(out, "metrics.json"), metrics)
    files = {"metrics": storage.join(out, "metrics.json")}
    misses = sorted([s for s in per_scene if s["missed"]], key=lambda s: (-len(s["missed"]), s["key"]))[:worst]
    alarms = sorted([s for s in per_scene if s["fp"]], key=lambda s: (-s["fp"], s["key"]))[:worst]
    sections = []
    for title, group in (("Worst misses (magenta: missed sign)", misses), ("Most false alarms (FP)", alarms)):
        cells = []
        for s in group:
            arr = kept.get(s["key"])
            if arr is None:
                continue
            pic = draw_detections(arr, s["detections"], truth=s["truth"], miss=s["missed"], scale=2)
            png = images.encode_png(pic)
            name = f"overlays/{_safe(s['key'])}.png"
            storage.write_bytes(storage.join(out, name), png)
            missed = ", ".join(s["truth_keys"][k] for k in s["missed"]) or "none"
            cells.append(f'<figure><img src="data:image/png;base64,{base64.b64encode(png).decode()}" '
                         f'alt="{html.escape(s["key"])}"><figcaption>{html.escape(s["key"])}: {s["signs"]} signs, '
                         f'missed: {html.escape(missed)}; {s["fp"]} false alarm(s)</figcaption></figure>')
        sections.append(f"<h2>{html.escape(title)}</h2>" + ("".join(cells) or "<p>none</p>"))
    m = metrics
    rows = [("mAP@0.5", f"{m['map_50']:.3f}"), ("mAP@[.5:.95]", f"{m['map']:.3f}"),
            ("mAP small (COCO, area < 32²)", f"{m['map_small']:.3f}"),
            (f"recall @ score ≥ {m['score_thresh']}", f"{m['recall']:.1%}")]
    rows += [(f"recall, signs {k} px (n={v['count']})", f"{v['recall']:.1%}") for k, v in m["recall_by_size"].items()]
    if m.get("end_to_end_accuracy") is not None:
        rows += [("end-to-end accuracy (found and right fine class)", f"{m['end_to_end_accuracy']:.1%}"),
                 ("classifier accuracy on found signs", f"{m['classification_accuracy_on_found']:.1%}")]
    rows += [("false positives / image", f"{m['fp_per_image']:.2f}"),
             ("scenes / s", f"{m['scenes_per_s']:.2f} on {html.escape(m['device'])}")]
    table = "".join(f"<tr><td>{html.escape(a)}</td><td class=n>{b}</td></tr>" for a, b in rows)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>signscale detection report</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;color:#1f2933}}table{{border-collapse:collapse}}
td{{padding:4px 12px;border-bottom:1px solid #ddd}}.n{{text-align:right;font-variant-numeric:tabular-nums}}
figure{{display:inline-block;margin:8px;vertical-align:top}}figure img{{max-width:1024px;border:1px solid #999}}
figcaption{{font-size:13px;color:#555;max-width:1024px}}</style></head><body>
<h1>Sign detection: {html.escape(str(m['scenes']))} scenes, {html.escape(str(m['signs']))} signs</h1>
<p>detector <code>{html.escape(m['detector'])}</code>, classifier <code>{html.escape(m['classifier'] or '-')}</code>,
data <code>{html.escape(m['data'])}</code></p><table>{table}</table>
<p>Boxes: white = ground truth, magenta = missed sign, coloured = detection labelled
"class detector-score/classifier-confidence" (colour = category), "FP" = false alarm.</p>
{''.join(sections)}</body></html>"""
    storage.write_bytes(storage.join(out, "report.html"), doc.encode())
    files["report"] = storage.join(out, "report.html")
    files["overlays"] = storage.join(out, "overlays")
    return files


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)[:120]


# ---------------------------------------------------------------------------------------------
# Demo


def demo_detection(out: str, *, classifier: str = "", train_scenes: int = 300, test_scenes: int = 40,
                   steps: int = 240, seed: int = 0, threads: int = 0) -> dict[str, Any]:
    """The detection leg of ``signscale demo``: synthetic scenes -> pack -> train a detector briefly from
    ``classifier``'s features -> evaluate on unseen scenes -> report with annotated pictures.

    About a minute on 2 CPU cores: 240 steps of 8 tiles give a usable detector, enough to see the
    whole path (the figures in docs/detection.md come from a longer run). Returns summary and files.
    """
    from signscale.sources.scenes import ScenePackConfig, pack_scenes
    from signscale.train_detector import DetTrainConfig, train_detector

    out = out.rstrip("/")
    train = pack_scenes(ScenePackConfig(source=f"scenes-synthetic:?n={train_scenes}&seed={seed + 1}",
                                        out=storage.join(out, "data", "scenes-train"), shard_mb=16))
    test = pack_scenes(ScenePackConfig(source=f"scenes-synthetic:?n={test_scenes}&seed={seed + 1000}",
                                       out=storage.join(out, "data", "scenes-test"), shard_mb=16))
    trained = train_detector(DetTrainConfig(data=(train.url,), out=storage.join(out, "detector"), backbone=classifier,
                                            max_steps=steps, batch_size=8, tile=(224, 160),
                                            warmup_steps=max(1, min(50, steps // 6)),
                                            freeze_stages=2 if classifier else 0, fpn_channels=32, workers=0,
                                            seed=seed, threads=threads, log_every=max(1, steps // 6)))
    report = evaluate_scenes(SceneEvalConfig(detector=trained.model_url, data=test.url, classifier=classifier,
                                             out=storage.join(out, "detection-report"), score_thresh=0.3,
                                             threads=threads))
    return {"summary": f"{train.summary()}\n  {trained.summary()}\n  {report.summary()}",
            "files": {"detector": trained.model_url, **{f"detection {k}": v for k, v in report.files.items()}},
            "metrics": report.metrics}
