"""Weather for training augmentation: fog, night, noise, low contrast and snow re-implemented in torch
with the severity tables of :mod:`signscale.corruptions` (which stays the reference, for robustness
evaluation), each applied in place to the rows of a batch that drew it; and the random numbers each
effect works with, drawn the same way for the torch path and the compiled kernel."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from signscale.training.filters import blur_matrix, blur_weights, normal, uniform

try:
    from signscale import kernels
except ImportError:  # no numba (a Python it has no wheels for yet): the torch path does the work
    kernels = None  # type: ignore[assignment]


class PerDevice(dict):
    """A table of per-severity parameters, copied to each device on first use: ``table[device]``.

    Shaped [severities, parameters, 1, 1], so that ``table[device][level][:, i:i + 1]`` broadcasts
    over a [k, C, H, W] batch with one indexing op (at 32 px the op count, not the arithmetic,
    is what these small subsets cost).
    """

    def __init__(self, values: list[list[float]]) -> None:
        super().__init__()
        self.values = values

    def __missing__(self, device: torch.device) -> Tensor:
        t = self[device] = torch.tensor(self.values, dtype=torch.float32, device=device)[:, :, None, None]
        return t


def towards_(x: Tensor, target: Tensor | float, amount: Tensor) -> Tensor:
    """In place ``x += amount * (target - x)``: what ``torch.lerp`` computes, but lerp and addcmul are
    several times slower than plain arithmetic when an operand broadcasts (per sample or channel)."""
    return x.add_((target - x).mul_(amount))


# Each effect changes its rows of the subset in place, given their rows of its table (one row per
# severity 1..5, with the values of signscale.corruptions), their U[0, 1) value, their random
# numbers (drawn by weather_draw; None for an effect that draws none) and the image size relative
# to 32 px.
Weather = Callable[[Tensor, Tensor, Tensor, Tensor | None, float], None]


_FOG_PARAMS = PerDevice([[a] for a in (0.25, 0.35, 0.45, 0.55, 0.65)])  # thickness


def _fog(x: Tensor, t: Tensor, value: Tensor, draw: Tensor | None, scale: float) -> None:
    """Blend towards light grey, thicker towards the top and in uneven patches (corruptions.fog)."""
    n, _, h, w = x.shape
    assert draw is not None
    coarse = draw.mul_(0.5).add_(0.75)  # U[0, 1) [n, 1, 4, 4] -> patches in [0.75, 1.25]
    # bilinear upsampling of the 4x4 grid (whose rows sum to one), with the top-to-bottom thinning
    alpha = torch.matmul(torch.matmul(fog_rows(h, x.device), coarse), upsampler(w, 4, x.device).T)
    towards_(x, value.view(n, 1, 1, 1), alpha.mul_(t).clamp_(0.0, 0.92))


@functools.lru_cache(maxsize=32)
def upsampler(n: int, cells: int, device: torch.device) -> Tensor:
    """[n, cells] bilinear weights, as ``F.interpolate(align_corners=True)`` and corruptions._smooth_field.

    Two tiny matrix products upsample a batch of coarse grids several times faster than interpolate.
    """
    pos = torch.linspace(0, cells - 1, n, device=device)
    lo = pos.long().clamp_(max=cells - 2)
    frac = pos - lo
    m = torch.zeros(n, cells, device=device)
    m[torch.arange(n, device=device), lo] = 1 - frac
    m[torch.arange(n, device=device), lo + 1] = frac
    return m


@functools.lru_cache(maxsize=32)
def fog_rows(n: int, device: torch.device) -> Tensor:
    """The row upsampler scaled by corruptions.fog's vertical profile (1.15 at the top to 0.85)."""
    return torch.linspace(1.15, 0.85, n, device=device)[:, None] * upsampler(n, 4, device)


# gamma, noise sigma, gain * (r, g, b) tint
_NIGHT_PARAMS = PerDevice([[1.3 + 0.3 * s, 0.008 + 0.008 * s] + [(0.95 - 0.11 * s) * c for c in (
    1 - 0.04 * s, 1 - 0.02 * s, 1 + 0.03 * s)] for s in range(1, 6)])


def _night(x: Tensor, t: Tensor, value: Tensor, draw: Tensor | None, scale: float) -> None:
    """Gamma darkening with a blue cast and sensor noise, as with a dashcam after dusk (corruptions.night)."""
    assert draw is not None
    x.pow_(t[:, :1]).mul_(t[:, 2:]).add_(draw.mul_(t[:, 1:2]))


_NOISE_PARAMS = PerDevice([[s] for s in (0.03, 0.05, 0.08, 0.11, 0.15)])  # sigma


def _noise(x: Tensor, t: Tensor, value: Tensor, draw: Tensor | None, scale: float) -> None:
    """Additive Gaussian sensor noise (corruptions.noise)."""
    assert draw is not None
    x.add_(draw.mul_(t))


_CONTRAST_PARAMS = PerDevice([[1 - k] for k in (0.75, 0.6, 0.45, 0.32, 0.22)])  # 1 - the contrast kept


def _contrast(x: Tensor, t: Tensor, value: Tensor, draw: Tensor | None, scale: float) -> None:
    """Pull every pixel towards the image mean: haze, cheap sensor, overcast (corruptions.contrast)."""
    towards_(x, x.mean(dim=(1, 2, 3), keepdim=True), t)


# whitening, flake density, larger flakes
_SNOW_PARAMS = PerDevice([[whiten, density, float(s >= 3)] for s, whiten, density in zip(
    range(1, 6), (0.12, 0.2, 0.28, 0.36, 0.45), (0.012, 0.02, 0.03, 0.04, 0.055), strict=True)])


def _snow(x: Tensor, t: Tensor, value: Tensor, draw: Tensor | None, scale: float) -> None:
    """Whitened, low-contrast scene with white flakes that grow with severity (corruptions.snow)."""
    h, w = x.shape[-2:]
    assert draw is not None  # U[0, 1) [n, 1, h, w]
    towards_(x, 0.85, t[:, :1])
    density = t[:, 1:2]
    # one draw per pixel: below `density` it is a seed, and draw / density is then U(0, 1) again
    hit = draw < density
    seeds = hit * draw.div_(density).mul_(0.4).add_(0.6)  # opacity in [0.6, 1)
    small, large = _grow(seeds, max(1, round(scale))), _grow(seeds, max(1, round(2 * scale)))
    flakes = torch.where(t[:, 2:] > 0, large, small)
    if scale > 1.5:  # corruptions.snow softens flakes with sigma 0.3 px per 32 px: invisible below 48 px
        flakes = soften(h, scale, x.device) @ flakes @ soften(w, scale, x.device).T
    towards_(x, 0.97, flakes.mul_(1.3).clamp_(max=1.0))


@functools.lru_cache(maxsize=32)
def soften(n: int, scale: float, device: torch.device) -> Tensor:
    """The fixed [n, n] blur (sigma 0.3 px at 32 px) that rounds snow flakes, as corruptions.snow."""
    sigma, radius = _soften_sigma(scale, device)
    return blur_matrix(sigma, n, radius)[0]


def _soften_sigma(scale: float, device: torch.device) -> tuple[Tensor, int]:
    """The flakes' blur: sigma 0.3 px at 32 px, and its radius."""
    return torch.full((1,), 0.3 * scale, device=device), math.ceil(2.5 * 0.3 * scale)


def _grow(seeds: Tensor, size: int) -> Tensor:
    """Each seed becomes a size x size flake, anchored like corruptions._smear: a running maximum
    over shifted copies along each axis (a tenth of the cost of ``max_pool2d``)."""
    if size <= 1:
        return seeds
    out = seeds
    for axis in (-1, -2):
        n = out.shape[axis]
        grown = out.clone()
        for shift in range(1, size):
            dst = grown.narrow(axis, shift, n - shift)
            torch.maximum(dst, out.narrow(axis, 0, n - shift), out=dst)
        out = grown
    return out


WEATHER_EFFECTS: dict[str, tuple[Weather, PerDevice]] = {
    "fog": (_fog, _FOG_PARAMS), "night": (_night, _NIGHT_PARAMS), "noise": (_noise, _NOISE_PARAMS),
    "contrast": (_contrast, _CONTRAST_PARAMS), "snow": (_snow, _SNOW_PARAMS),
}


# The random numbers each weather effect works with, per image of size (h, w): the torch path
# (_weather) and the kernel path (_kernel_weather) both draw them here, so they draw the same.
WEATHER_DRAWS: dict[str, tuple[Callable[..., Tensor], Callable[[int, int], tuple[int, ...]]] | None] = {
    "fog": (uniform, lambda h, w: (1, 4, 4)), "night": (normal, lambda h, w: (3, h, w)),
    "noise": (normal, lambda h, w: (3, h, w)), "contrast": None, "snow": (uniform, lambda h, w: (1, h, w)),
}


def weather_draw(name: str, n: int, size: tuple[int, int], g: torch.Generator | None, device: torch.device
                  ) -> Tensor | None:
    """Weather kind ``name``'s random numbers for ``n`` images, [n, *shape] (None: it draws none)."""
    spec = WEATHER_DRAWS[name]
    return None if spec is None else spec[0]((n, *spec[1](*size)), g, device)


@functools.lru_cache(maxsize=16)
def draws_per_image(kinds: tuple[str, ...], size: tuple[int, int]) -> np.ndarray:
    """How many random numbers each weather kind draws per image."""
    specs = [WEATHER_DRAWS[name] for name in kinds]
    return np.array([0 if spec is None else math.prod(spec[1](*size)) for spec in specs], np.int64)


@functools.lru_cache(maxsize=32)
def soften_taps(scale: float, n: int) -> np.ndarray:
    """The taps of :func:`soften` for the kernel; none where snow is not softened (<= 48 px)."""
    if scale <= 1.5:
        return np.zeros(0, np.float32)
    sigma, radius = _soften_sigma(scale, torch.device("cpu"))
    return blur_weights(sigma, min(radius, n - 1))[0].numpy()
