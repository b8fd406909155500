"""Colour augmentation as one linear map per sample: the lighting terms, and the opt-in re-colouring of a
sign's design.

Brightness, contrast and saturation are what light and camera do to a sign; they keep its design.
The style terms change the design itself: a rotation of hue about the grey axis (a red ring turns
green or blue), a gain per channel (a white plate turns yellow, as warning signs are in China) and
grayscale. Within one country colour carries meaning (red prohibits, blue mandates), so the style
terms are off by default. They are the lever for a model that must name a meaning in a national
design it never saw, where the shape and the pictogram carry over and the paint does not.

Every term is linear in RGB, so a sample's whole colour step stays one 3x3 matrix and one offset:
the style matrix ``S`` acts first (the plate's paint), then the lighting matrix ``M``, whose
contrast pulls towards the mean luma of the re-coloured image, ``luma @ S @ mean(x)``. The compiled
kernel (:func:`signscale.kernels._style_matrix`) builds the same matrices from the same draws.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Luma weights (ITU-R BT.601), as torchvision's rgb_to_grayscale uses for saturation and contrast.
LUMA: tuple[float, float, float] = (0.299, 0.587, 0.114)

_CROSS = ((0.0, -1.0, 1.0), (1.0, 0.0, -1.0), (-1.0, 1.0, 0.0))  # [k]x for the grey axis k = (1, 1, 1)


def lighting_matrices(brightness: Tensor, contrast: Tensor, saturation: Tensor, luma: Tensor
                      ) -> tuple[Tensor, Tensor]:
    """Per sample, the [3, 3] matrix and the multiple of the image's mean luma that brightness,
    contrast and saturation add up to, in pixel units.

    Brightness b, then contrast c (towards the image's mean luma m), then saturation s (towards
    each pixel's luma g) compose to ``y = s*c*b*x + (1-s)*c*b*g + (1-c)*b*m``, which is linear in
    the channels: ``matrix @ x + shift * m``. Unlike torchvision the order is fixed and there is
    no clamp between the steps; both only matter at factors far beyond the defaults.
    """
    b, c, s = brightness[:, None, None], contrast[:, None, None], saturation[:, None, None]
    cb = c * b
    eye = torch.eye(3, device=luma.device)
    return s * cb * eye + (1 - s) * cb * luma.expand(3, 3), (b - cb)[:, 0, 0]


def style_matrices(hue: Tensor, gains: Tensor) -> Tensor:
    """[B, 3, 3]: a rotation by ``hue`` radians about the grey axis, then a gain per channel ([B, 3]).

    The rotation (Rodrigues' formula about k = (1, 1, 1) / sqrt(3)) keeps greys grey and each pixel's
    channel sum, so it changes the paint, not the lightness. Both are invertible for positive gains,
    so the ``zeros`` padding of the compiled kernel can still find the colour its ring must hold.
    """
    cos, sin = hue.cos()[:, None, None], hue.sin()[:, None, None]
    eye = torch.eye(3, device=hue.device)
    third = torch.full((3, 3), 1.0 / 3.0, device=hue.device)
    cross = torch.tensor(_CROSS, device=hue.device) / math.sqrt(3.0)
    rotation = cos * eye + (1 - cos) * third + sin * cross
    return gains[:, :, None] * rotation
