"""The sign detector: torchvision FCOS on a signscale classifier's convolutional stages plus an FPN.

**Why FCOS.** Signs are small, nearly square and often close together (two on one pole). FCOS is
anchor-free: every feature-map location inside a box (near its centre) regresses the box edges, so
there is no anchor-shape or IoU-threshold tuning, and a 12 px sign still gets several positive
locations through centre sampling, where an anchor matcher with 32 px anchors gives it none.
RetinaNet would work too; FCOS needs fewer hyper-parameters for the same head.

**Why a stride-4 level.** A 12 px sign is 1.5 cells at stride 8 and under one at stride 16, the
usual finest FPN level; published detectors lose ~23 mAP points on small GTSDB signs. The
pyramid here is P2 (stride 4) for signs under ~32 px, P3 (stride 8) for 32-64 px and P4 (stride
16, max-pooled from P3) above, by setting FCOS's per-level size ranges (its ``anchor_sizes`` of
2, 4, 8 px give ranges max-edge-distance < 16, 16-32, > 32 px).

**Why this backbone.** No pretrained downloads exist here, and detectors trained from scratch need
hundreds of epochs. A signscale classifier (``msnet``: three conv stages, strides 2-4-8) has already
learned what sign rims, colours and pictograms look like from 40k crops; its stages, run fully
convolutionally over the whole scene, become the backbone (the head, pooling and STN are dropped:
a spatial transformer warps a crop, not a road). Its preprocessing (mean/std) is kept as the
detector's normalisation, so the initial features are the ones the classifier learned.

**Resolution.** Scenes are processed at their native resolution (``scale=1``): resizing a 1360x800
GTSDB frame to 800 px short side would be torchvision's default and would make small signs smaller.
``scale`` scales every input (e.g. 0.5 for a faster, coarser pass).

The module is a plain ``nn.Module`` rebuilt from a JSON-able config (``detector_config``); devices,
precision and DDP belong to :mod:`signscale.detection.train`.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from signscale.labels import CATEGORIES, LabelSpace, category_ids

DETECTOR_FORMAT = 1
CLASS_MODES = ("sign", "category")


class DetectorError(ValueError):
    """A detector config or checkpoint that cannot be used; names the field."""


def _stage_modules(classifier: nn.Module) -> list[nn.Module]:
    """The classifier's convolutional stages in order, without pooling head or STN."""
    stages = getattr(classifier, "stages", None)
    if isinstance(stages, nn.ModuleList):
        return list(stages)
    bb = getattr(classifier, "backbone", None)
    if bb is not None and hasattr(bb, "layer1"):  # ResNet18Small
        stem = nn.Sequential(bb.conv1, bb.bn1, bb.relu, bb.layer1)
        return [stem, bb.layer2, bb.layer3, bb.layer4]
    raise DetectorError(f"{type(classifier).__name__} has no convolutional stages a detector can use "
                        "(expected .stages or a ResNet .backbone)")


class ClassifierBackbone(nn.Module):
    """Stages of a classifier + FPN: returns an OrderedDict of feature maps (strides 4, 8, 16)."""

    def __init__(self, classifier: nn.Module, *, fpn_channels: int = 64, min_stride: int = 4) -> None:
        super().__init__()
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

        self.stages = nn.ModuleList(_stage_modules(classifier))
        was = classifier.training
        self.stages.eval()
        with torch.no_grad():  # strides and widths by probing, so any stage layout works
            x = torch.zeros(1, 3, 64, 64)
            shapes = []
            for s in self.stages:
                x = s(x)
                shapes.append((64 // x.shape[-1], x.shape[1]))
        self.stages.train(was)
        self.use = [i for i, (stride, _) in enumerate(shapes) if stride >= min_stride][:2]
        if len(self.use) < 2:
            raise DetectorError(f"the classifier's stages have strides {[s for s, _ in shapes]}; the detector "
                                f"needs two stages at stride >= {min_stride}")
        self.strides = [shapes[i][0] for i in self.use] + [shapes[self.use[-1]][0] * 2]
        self.fpn = FeaturePyramidNetwork([shapes[i][1] for i in self.use], fpn_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = fpn_channels
        self.last = self.use[-1]

    def train(self, mode: bool = True) -> ClassifierBackbone:
        """BatchNorm in the stages keeps the classifier's statistics: a detection batch holds a handful
        of scenes, far too few for good batch statistics (the usual frozen-BN choice of detectors)."""
        super().train(mode)
        for m in self.stages.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def freeze(self, n: int) -> None:
        """Stop training the first ``n`` stages: the full-resolution stage costs the most backward time
        and learns the most generic features (edges, colours), which the classifier already has."""
        for stage in self.stages[:n]:
            for p in stage.parameters():
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, stage in enumerate(self.stages[: self.last + 1]):
            x = stage(x)
            if i in self.use:
                feats[f"p{self.use.index(i)}"] = x
        return self.fpn(feats)


def _native_transform(min_size: int, max_size: int, mean: list[float], std: list[float], scale: float) -> nn.Module:
    """torchvision's transform, but resizing by a fixed ``scale`` (1: native) instead of to 800 px."""
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    class _Fixed(GeneralizedRCNNTransform):
        def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
            if self.scale == 1.0:
                return image, target
            h, w = image.shape[-2:]
            size = [max(8, round(h * self.scale)), max(8, round(w * self.scale))]
            image = nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
            if target is not None and "boxes" in target:
                target = {**target, "boxes": target["boxes"] * torch.tensor(
                    [size[1] / w, size[0] / h, size[1] / w, size[0] / h], device=image.device)}
            return image, target

    t = _Fixed(min_size, max_size, mean, std, size_divisible=32)
    t.scale = float(scale)
    return t


def class_names(mode: str, space: LabelSpace | None = None) -> list[str]:
    """Names of the detector's foreground classes (label 1..K; 0 is FCOS's unused background)."""
    if mode == "sign":
        return ["sign"]
    if mode == "category":
        return list(CATEGORIES)
    raise DetectorError(f"classes: expected one of {', '.join(CLASS_MODES)}, got {mode!r}")


def detector_labels(fine: torch.Tensor, mode: str, space: LabelSpace) -> torch.Tensor:
    """Fine class ids -> detector labels (1..K)."""
    if mode == "sign":
        return torch.ones_like(fine)
    cats = torch.as_tensor(category_ids(space), dtype=torch.int64)
    return cats[fine] + 1


def make_config(
    backbone_config: Mapping[str, Any],
    *,
    preprocess: Mapping[str, Any],
    classes: str = "sign",
    fpn_channels: int = 64,
    head_convs: int = 2,
    scale: float = 1.0,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
) -> dict[str, Any]:
    """The plain dict that rebuilds a detector (stored in every checkpoint and model)."""
    if classes not in CLASS_MODES:
        raise DetectorError(f"classes: expected one of {', '.join(CLASS_MODES)}, got {classes!r}")
    if not 0.05 <= scale <= 4:
        raise DetectorError(f"scale: {scale} is outside 0.05..4")
    return {"format": DETECTOR_FORMAT, "arch": "fcos", "backbone": copy.deepcopy(dict(backbone_config)),
            "classes": classes, "class_names": class_names(classes), "fpn_channels": int(fpn_channels),
            "scale": float(scale), "mean": list(preprocess["mean"]), "std": list(preprocess["std"]),
            "head_convs": int(head_convs), "score_thresh": float(score_thresh), "nms_thresh": float(nms_thresh),
            "detections_per_img": int(detections_per_img)}


def build_detector(config: Mapping[str, Any], classifier: nn.Module | None = None) -> nn.Module:
    """FCOS from ``config`` (see :func:`make_config`); ``classifier`` supplies initial backbone weights."""
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    from signscale.models import rebuild

    if config.get("format") != DETECTOR_FORMAT or config.get("arch") != "fcos":
        raise DetectorError(f"detector config format {config.get('format')!r}/{config.get('arch')!r} is not "
                            f"supported (expected {DETECTOR_FORMAT}/fcos)")
    base = classifier if classifier is not None else rebuild(config["backbone"])
    backbone = ClassifierBackbone(base, fpn_channels=config["fpn_channels"])
    # One "anchor" per location whose size sets FCOS's per-level box-size range (4x..8x the size).
    sizes = tuple((s // 2,) for s in backbone.strides)
    anchors = AnchorGenerator(sizes=sizes, aspect_ratios=((1.0,),) * len(sizes))
    from torchvision.models.detection.fcos import FCOSHead

    # Two conv layers per head branch, not four: the head runs at stride 4, where it costs more than the
    # backbone; on CPU this halves a training step for little accuracy on one- or four-class problems.
    head = FCOSHead(backbone.out_channels, 1, len(config["class_names"]) + 1, num_convs=config.get("head_convs", 2))
    model = FCOS(backbone, num_classes=len(config["class_names"]) + 1, anchor_generator=anchors, head=head,
                 score_thresh=config["score_thresh"], nms_thresh=config["nms_thresh"],
                 detections_per_img=config["detections_per_img"], topk_candidates=1000)
    model.transform = _native_transform(800, 1333, config["mean"], config["std"], config["scale"])
    model.signscale_detector_config = copy.deepcopy(dict(config))
    return model


def detector_config(model: nn.Module) -> dict[str, Any]:
    while not hasattr(model, "signscale_detector_config") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    cfg = getattr(model, "signscale_detector_config", None)
    if cfg is None:
        raise DetectorError("model was not built by signscale.detection.detector.build_detector")
    return copy.deepcopy(cfg)


def set_thresholds(model: nn.Module, *, score_thresh: float | None = None, nms_thresh: float | None = None) -> None:
    """Change inference thresholds of a built detector (evaluation wants a low score threshold)."""
    if score_thresh is not None:
        model.score_thresh = float(score_thresh)
    if nms_thresh is not None:
        model.nms_thresh = float(nms_thresh)
