"""Separable blurs as banded matrices (border reflection folded in: two batched matrix products beat
grouped convolutions several times on small images), a bank of them built once per size, and the
batch-wide uniform and normal draws the augmentation and its weather share."""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor

try:
    from signscale import kernels
except ImportError:  # no numba (a Python it has no wheels for yet): the torch path does the work
    kernels = None  # type: ignore[assignment]


def uniform(shape: tuple[int, ...], g: torch.Generator | None, device: torch.device) -> Tensor:
    """U[0, 1) drawn on the generator's device (so a seed means the same numbers) then moved."""
    where = g.device if g is not None else device
    return torch.rand(shape, generator=g, device=where).to(device)


def normal(shape: tuple[int, ...], g: torch.Generator | None, device: torch.device) -> Tensor:
    where = g.device if g is not None else device
    return torch.randn(shape, generator=g, device=where).to(device)


def separable(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Filter each [k, C, H, W] image by its [k, H, H] matrix along columns and [k, W, W] along rows.

    With banded blur matrices that have the border reflection folded in, this is a separable blur
    as two batched matrix products, which on small images beats grouped convolutions several times.
    """
    n, c, h, w = x.shape
    y = torch.bmm(x.reshape(n, c * h, w), cols.transpose(1, 2)).view(n * c, h, w)  # along each row
    return torch.bmm(rows.repeat_interleave(c, 0), y).view(n, c, h, w)  # along each column


# Blur strengths are drawn from a bank of this many sigmas, evenly spaced over blur_sigma: the
# matrices are then built once, not per sample and batch.
BLUR_LEVELS = 8


@functools.lru_cache(maxsize=32)
def blur_bank(n: int, sigma: tuple[float, float], scale: float, device: torch.device) -> Tensor:
    """[BLUR_LEVELS, n, n] blur matrices for sigmas evenly spaced over ``sigma`` (pixels at 32 px)."""
    sigmas, radius = blur_levels(sigma, scale, device)
    return blur_matrix(sigmas, n, radius)


def blur_levels(sigma: tuple[float, float], scale: float, device: torch.device) -> tuple[Tensor, int]:
    """The bank's sigmas at this image size and the radius that covers the largest."""
    sigmas = torch.linspace(sigma[0] * scale, sigma[1] * scale, BLUR_LEVELS, device=device)
    return sigmas, max(1, math.ceil(2.5 * sigma[1] * scale))


def blur_matrix(sigma: Tensor, n: int, radius: int) -> Tensor:
    """[k, n, n] with ``(G @ v)[i] = sum_t w(t) v[reflect(i + t)]`` over |t| <= radius, w per sample."""
    radius = min(radius, n - 1)  # reflection reaches one image-width out at most
    taps = torch.arange(-radius, radius + 1, device=sigma.device)
    weights = blur_weights(sigma, radius)  # [k, T]
    src = torch.arange(n, device=sigma.device)[:, None] + taps  # [n, T]
    src = torch.where(src < 0, -src, torch.where(src > n - 1, 2 * (n - 1) - src, src))
    k = sigma.shape[0]
    g = torch.zeros(k, n, n, dtype=weights.dtype, device=sigma.device)
    return g.scatter_add_(2, src.expand(k, n, -1), weights[:, None, :].expand(k, n, -1))


def blur_weights(sigma: Tensor, radius: int) -> Tensor:
    """[k, 2 radius + 1] normalised Gaussian taps, one row per sigma."""
    taps = torch.arange(-radius, radius + 1, device=sigma.device)
    weights = torch.exp(-0.5 * (taps / sigma.clamp(min=1e-3)[:, None]) ** 2)
    return weights / weights.sum(1, keepdim=True)


@functools.lru_cache(maxsize=32)
def blur_taps(sigma: tuple[float, float], scale: float, n: int) -> np.ndarray:
    """The blur bank of :func:`blur_bank` as taps, float32 [BLUR_LEVELS, 2 radius + 1], for the kernel."""
    sigmas, radius = blur_levels(sigma, scale, torch.device("cpu"))
    return blur_weights(sigmas, min(radius, n - 1)).numpy()
