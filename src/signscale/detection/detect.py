"""Detect-then-classify: find every sign in a road scene, then name each one with a crop classifier.

Two stages, each replaceable:

1. a **detector** (:class:`BoxDetector`: anything with ``boxes(images) -> [(boxes, scores, labels)]``;
   by default the FCOS model of :mod:`signscale.detection.detector`) finds "a sign here";
2. every box is cropped with a relative ``margin`` (by default the one the classifier was trained
   for: none after ROI crops, 10% after whole GTSRB-style images), resized with the classifier's own preprocessing,
   and **all crops of all images are classified in one batch** (:class:`CropClassifier`, or anything
   with ``classify(crops) -> (ids, confidences)``), in any label space, any country.

``load_pipeline(detector_url, classifier_url).detect(images)`` is the API the service calls: images
are HxWx3 uint8 RGB arrays; the result per image is a list of dicts
``{"box": [x1, y1, x2, y2], "score", "class_id", "key", "name", "country", "confidence", "detector_class"}``.

A second stage trained with a "not a sign" class (``not_a_sign``, see :mod:`signscale.labels`) vetoes
the detector: a box it calls background is dropped, so a false alarm on foliage or a shop window is
removed instead of named (``keep_rejected=True`` keeps such boxes, flagged ``"rejected": True``, for
evaluation and reports).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from signscale import images as images_mod
from signscale.labels import LabelSpace
from signscale.transforms import Preprocess, to_input


class BoxDetector(Protocol):
    def boxes(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]: ...


class Classifier(Protocol):
    label_space: LabelSpace

    def classify(self, crops: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]: ...


class FcosDetector:
    """The signscale FCOS detector behind the :class:`BoxDetector` interface."""

    def __init__(self, model: torch.nn.Module, *, score_thresh: float = 0.3, device: str = "cpu",
                 class_names: Sequence[str] = ("sign",)) -> None:
        from signscale.detection.detector import set_thresholds

        # channels-last weights: oneDNN's convolutions and pooling run 1.36x faster per 816x480 frame on
        # 2 CPU threads than with NCHW weights (measured side by side); results equal to float rounding.
        self.model = fold_batchnorm(model.to(device).eval()).to(memory_format=torch.channels_last)
        set_thresholds(self.model, score_thresh=score_thresh)
        self.device = torch.device(device)
        self.class_names = list(class_names)

    @classmethod
    def load(cls, url: str, *, score_thresh: float = 0.3, device: str = "cpu") -> FcosDetector:
        from signscale.detection.train import load_detector

        model, meta = load_detector(url)
        return cls(model, score_thresh=score_thresh, device=device,
                   class_names=meta["model_config"]["class_names"])

    @torch.inference_mode()
    def boxes(self, images: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        from signscale.detection.train import to_detector_input

        if not len(images):
            return []
        x = to_detector_input([torch.tensor(_check_image(im, i))
                               for i, im in enumerate(images)], self.device)
        out = self.model(x)
        return [(o["boxes"].float().cpu().numpy(), o["scores"].float().cpu().numpy(), o["labels"].cpu().numpy())
                for o in out]


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (in eval mode) with every Conv2d -> BatchNorm2d pair of a Sequential folded into one
    convolution. Inference only: the backbone's frozen BatchNorm at full resolution was 16% of a
    816x480 frame's detector time; folded, the same outputs to float rounding."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for seq in [m for m in model.modules() if isinstance(m, torch.nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                seq[i], seq[i + 1] = fuse_conv_bn_eval(conv, bn), torch.nn.Identity()
    return model


class CropClassifier:
    """A signscale classifier artefact applied to crops with its own preprocessing."""

    def __init__(self, model: torch.nn.Module, pre: Preprocess, space: LabelSpace, device: str = "cpu", *,
                 trained_on_roi: bool = False) -> None:
        self.model = model.to(device).eval()
        self.trained_on_roi = trained_on_roi
        self.pre = pre
        self.label_space = space
        self.device = torch.device(device)

    @classmethod
    def load(cls, url: str, *, device: str = "cpu") -> CropClassifier:
        from signscale.training.checkpoint import load_model

        model, meta = load_model(url, classifier=True)
        return cls(model, Preprocess.from_dict(meta["preprocess"]), LabelSpace.from_dict(meta["label_space"]), device,
                   trained_on_roi=meta.get("data_crop") == "roi")

    @torch.no_grad()
    def classify(self, crops: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if not len(crops):
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        batch = np.stack([images_mod.resize(c, self.pre.image_size) for c in crops])
        x = to_input(torch.from_numpy(batch).to(self.device), self.pre)
        prob = torch.softmax(self.model(x).float(), dim=1)
        conf, ids = prob.max(dim=1)
        return ids.cpu().numpy(), conf.cpu().numpy()


def _check_image(im: np.ndarray, i: int) -> np.ndarray:
    if not isinstance(im, np.ndarray) or im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
        shape = getattr(im, "shape", None)
        raise ValueError(f"image {i}: expected an HxWx3 uint8 RGB array, got {type(im).__name__} {shape} "
                         f"{getattr(im, 'dtype', '')}")
    return im


@dataclass
class DetectPipeline:
    """Detector + classifier; :meth:`detect` is the whole public behaviour."""

    detector: Any  # BoxDetector
    classifier: Any  # Classifier
    margin: float = 0.1
    detector_names: tuple[str, ...] = ("sign",)

    def detect(self, images: list[np.ndarray], *, keep_rejected: bool = False) -> list[list[dict[str, Any]]]:
        """Per image, per found sign: box, detector score, fine class and classifier confidence.

        ``keep_rejected``: also return the boxes the second stage calls "not a sign", flagged
        ``"rejected": True`` (evaluation counts what the rejection removed)."""
        found = self.detector.boxes(images)
        crops, where = [], []
        for i, (im, (boxes, _, _)) in enumerate(zip(images, found)):
            for j, b in enumerate(boxes):
                try:
                    crops.append(images_mod.crop_box(im, tuple(float(v) for v in b), margin=self.margin))
                    where.append((i, j))
                except images_mod.ImageError:
                    continue  # a degenerate box at the border: nothing to classify
        ids, conf = self.classifier.classify(crops)  # one batch for every crop of every image
        space = self.classifier.label_space
        background = space.background_id if space is not None else None
        out: list[list[dict[str, Any]]] = [[] for _ in images]
        for (i, j), cid, c in zip(where, ids, conf):
            boxes, scores, labels = found[i]
            dl = int(labels[j]) - 1
            det_name = self.detector_names[dl] if 0 <= dl < len(self.detector_names) else "sign"
            entry = {"box": [round(float(v), 1) for v in boxes[j]], "score": round(float(scores[j]), 4),
                     "detector_class": det_name}
            if space is not None:  # no second stage: the detector's class is all there is
                cls = space[int(cid)]
                entry.update(class_id=int(cid), key=cls.key, name=cls.name, country=cls.country,
                             confidence=round(float(c), 4))
                if int(cid) == background:
                    if not keep_rejected:
                        continue
                    entry["rejected"] = True
            out[i].append(entry)
        return out


def load_pipeline(detector_url: str, classifier_url: str, *, score_thresh: float = 0.3, margin: float | None = None,
                  device: str = "cpu") -> DetectPipeline:
    """The two-stage pipeline from a detector model folder and a classifier model folder.

    ``margin=None`` picks the crop margin the classifier was trained for: 0 for a classifier trained on
    ROI crops (``data_crop: roi`` in its model.json; the detector is trained on the same sign boxes, and
    on held-out scenes a 0.1 margin cost this pairing 3 points of end-to-end accuracy), else 0.1 (whole
    GTSRB-style images keep ~10% of background around the sign).
    """
    det = FcosDetector.load(detector_url, score_thresh=score_thresh, device=device)
    clf = CropClassifier.load(classifier_url, device=device)
    if margin is None:
        margin = 0.0 if clf.trained_on_roi else 0.1
    return DetectPipeline(det, clf, margin=margin, detector_names=tuple(det.class_names))


# ---------------------------------------------------------------------------------------------
# Pictures


_COLOURS = {"prohibitory": (230, 40, 40), "danger": (255, 170, 0), "mandatory": (40, 110, 255), "other": (40, 200, 90)}


def draw_detections(image: np.ndarray, dets: Sequence[dict[str, Any]], *, truth: Sequence[Sequence[float]] = (),
                    miss: Sequence[int] = (), scale: int = 1) -> np.ndarray:
    """The image with each detection boxed and labelled "name score/confidence"; ground truth (thin
    white) and missed signs (dashed magenta) when given. ``scale`` enlarges the picture first."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(image)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=max(10, 6 * scale + 4))
    except TypeError:
        font = ImageFont.load_default()
    for k, b in enumerate(truth):
        x1, y1, x2, y2 = (v * scale for v in b)
        d.rectangle((x1 - 1, y1 - 1, x2 + 1, y2 + 1), outline=(255, 0, 255) if k in miss else (255, 255, 255),
                    width=2 if k in miss else 1)
    for det in dets:
        x1, y1, x2, y2 = (v * scale for v in det["box"])
        false_alarm = det.get("tag") == "FP"
        colour = (255, 60, 60) if false_alarm else _COLOURS.get(det.get("category", ""), (255, 230, 0))
        d.rectangle((x1, y1, x2, y2), outline=colour, width=1 if false_alarm else 2)
        text = f"FP {det['score']:.2f}" if false_alarm else \
            f"{det.get('key', det.get('name', 'sign'))} {det['score']:.2f}/{det.get('confidence', 0):.2f}"
        tw = d.textlength(text, font=font)
        ty = y1 - 12 - 2 * scale if y1 > 14 + 2 * scale else y2 + 1
        d.rectangle((x1, ty, x1 + tw + 4, ty + 11 + 2 * scale), fill=(0, 0, 0))
        d.text((x1 + 2, ty), text, fill=colour, font=font)
    return np.asarray(img)


def detect_files(pipeline: DetectPipeline, paths: Sequence[str], out: str, *, batch: int = 4) -> list[dict[str, Any]]:
    """Run the pipeline over image files (any storage URL); write ``NAME.det.png`` and ``NAME.json`` to ``out``."""
    import posixpath

    from signscale import storage

    storage.makedirs(out)
    summary = []
    for start in range(0, len(paths), batch):
        chunk = paths[start:start + batch]
        arrs = [images_mod.decode(storage.read_bytes(p)) for p in chunk]
        results = pipeline.detect(arrs)
        for p, arr, dets in zip(chunk, arrs, results):
            stem = posixpath.basename(p.rstrip("/")).rsplit(".", 1)[0]
            for det in dets:
                det["category"] = pipeline.classifier.label_space[det["class_id"]].category
            storage.write_bytes(storage.join(out, f"{stem}.det.png"), images_mod.encode_png(draw_detections(arr, dets)))
            doc = {"image": p, "width": arr.shape[1], "height": arr.shape[0], "detections": dets}
            storage.write_json(storage.join(out, f"{stem}.json"), doc)
            summary.append({"image": p, "signs": len(dets), "json": storage.join(out, f"{stem}.json")})
    return summary
