"""The preprocessing: uint8 NHWC batches in, normalised float32 NCHW out.

:func:`to_input` is *the* preprocessing. Training, evaluation, prediction, serving and the ONNX
export call exactly this function (and training's augmentation with every effect off returns exactly
its output), so a model never sees a different resize or normalisation at serving time than it saw
in training. :class:`Preprocess` records the size and statistics with the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from signscale import config

# Per-channel statistics of GTSRB training crops in [0, 1] (the figures commonly quoted for
# GTSRB): sign crops are darker and flatter than ImageNet photos, whose statistics would leave the
# inputs off-centre. Crops of road signs from other countries are close to these.
GTSRB_MEAN: tuple[float, float, float] = (0.3403, 0.3121, 0.3214)
GTSRB_STD: tuple[float, float, float] = (0.2724, 0.2608, 0.2669)


# Spatial sizes are tuned at 32 px, as in signscale.corruptions, and grow with the image.
REFERENCE_PX = 32.0

Padding = Literal["reflection", "border", "zeros"]


# ---------------------------------------------------------------------------------------------
# Configs


@dataclass(frozen=True)
class Preprocess:
    """What every model input goes through: resize to ``image_size`` and normalise per channel.

    Saved with every checkpoint and model, so a predictor rebuilds exactly the training inputs.
    """

    image_size: int = 32  # the side in pixels: the name it has end to end (pack, stream, model)
    mean: tuple[float, float, float] = GTSRB_MEAN
    std: tuple[float, float, float] = GTSRB_STD

    def __post_init__(self) -> None:
        if self.image_size < 4:
            raise ValueError(f"image_size: expected at least 4 pixels, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean, std: expected 3 values each (RGB), got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std: every value must be > 0, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        return config.to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """From a model's ``preprocess``; models written before the name was ``image_size`` say ``size``."""
        if "size" in d and "image_size" not in d:
            d = {**{k: v for k, v in d.items() if k != "size"}, "image_size": d["size"]}
        return config.build(cls, d)

    def scale_bias(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """[1, 3, 1, 1] tensors with ``x * scale + bias`` = normalised ``x / 255``: two cheap passes."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        return 1.0 / (255.0 * std), -mean / std


# ---------------------------------------------------------------------------------------------
# Preprocessing: shared by training, evaluation and serving


def to_input(images_uint8_nhwc: Tensor, pre: Preprocess, *, channels_last: bool = False) -> Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, size, size], resized (antialiased) and normalised."""
    check_images(images_uint8_nhwc)
    x = resize(to_float_nchw(images_uint8_nhwc, channels_last), pre.image_size)
    scale, bias = pre.scale_bias(x.device)
    return layout(x.mul_(scale).add_(bias), channels_last)  # in place: x is a fresh tensor


def check_images(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [B, H, W, 3] image batch, "
                         f"got {images.dtype} {tuple(images.shape)}")


def to_float_nchw(images: Tensor, channels_last: bool) -> Tensor:
    """uint8 NHWC -> a fresh float NCHW tensor in [0, 255].

    The permuted view is already NCHW in channels-last memory order, so converting it keeps that
    layout almost for free. For contiguous NCHW, one copy converts and transposes at once: a single
    allocation matters on CPU, where each fresh buffer costs page faults.
    """
    x = images.permute(0, 3, 1, 2)
    if channels_last:
        return x.float()
    return torch.empty(x.shape, dtype=torch.float32, device=x.device).copy_(x)


def resize(x: Tensor, size: int) -> Tensor:
    """Antialiased bilinear resize: downscaling without aliasing, and no overshoot beyond [0, 255]."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def layout(x: Tensor, channels_last: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# Geometry: one 3x3 matrix per sample, one grid_sample per batch
