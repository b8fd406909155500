"""Camera faults for training augmentation: JPEG, motion blur, low light, defocus and lens rain at a
training strength, applied by :mod:`signscale.corruptions` itself.

Why not a torch re-implementation and a kernel twin, as the weather has (:mod:`.weather`)? The faults
come after everything else -- a camera compresses and smears the frame it caught, whatever the sign's
pose and light -- so they work on the augmentation's finished 8-bit pixels, which both of
:class:`~signscale.training.augment.BatchAugment`'s paths produce: the loader workers' ``pixels``
(torch ops or the compiled kernel) and the device path's ``__call__`` (un-normalised to pixels, faulted,
normalised back). One numpy definition therefore serves evaluation and training, and a model trained
with them is trained on exactly the faults ``signscale evaluate --corruptions`` measures. JPEG goes
through libjpeg, which has no torch twin anyway. The price is on the device path: the faulted rows make a
round trip to the host (one sync per batch), paid only when the faults are on.

Draws come from the caller's ``torch.Generator`` after all of the augmentation's own draws, so turning
the faults on leaves every other draw of a batch as it was, and with ``camera == 0`` nothing is drawn
and nothing changes. Per sample: whether it gets a fault (probability ``camera``), which kind (uniform over
``camera_kinds``) and which severity (uniform over ``camera_severity``, inclusive); then one integer
seeds the numpy generator the corruptions draw from, group by group in a fixed order (kind, then
severity), so the same seed gives the same pixels in any process and on either path.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from signscale.corruptions import CAMERA_FAULTS, SEVERITIES, apply_corruption
from signscale.training.filters import uniform


def check(camera: float, kinds: tuple[str, ...], severity: tuple[int, int]) -> None:
    """Validate the augmentation config's ``camera``, ``camera_kinds`` and ``camera_severity`` fields."""
    if not 0.0 <= camera <= 1.0:
        raise ValueError(f"camera: a probability must be in [0, 1], got {camera}")
    unknown = [k for k in kinds if k not in CAMERA_FAULTS]
    if unknown or (camera > 0 and not kinds):
        raise ValueError(f"camera_kinds: got {list(kinds)}; valid kinds: {', '.join(CAMERA_FAULTS)} "
                         f"(the weather kinds go in weather_kinds)")
    if len(severity) != 2 or not (SEVERITIES[0] <= severity[0] <= severity[1] <= SEVERITIES[-1]):
        raise ValueError(f"camera_severity: expected (min, max) with 1 <= min <= max <= 5, e.g. 1,3; "
                         f"got {tuple(severity)}")


def draw(cfg: Any, n: int, g: torch.Generator | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Which of ``n`` samples get a fault, each one's kind index and severity, and the numpy seed.

    ``cfg`` is the augmentation config (its ``camera``, ``camera_kinds`` and ``camera_severity``).
    """
    u = uniform((n, 3), g, torch.device("cpu")).numpy()
    lo, hi = cfg.camera_severity
    hit = u[:, 0] < cfg.camera
    kind = np.minimum((u[:, 1] * len(cfg.camera_kinds)).astype(np.int64), len(cfg.camera_kinds) - 1)
    severity = np.minimum(lo + (u[:, 2] * (hi - lo + 1)).astype(np.int64), hi)
    where = g.device if g is not None else torch.device("cpu")
    seed = int(torch.randint(0, 2**62, (1,), generator=g, device=where).item())
    return hit, kind, severity, seed


def fault_pixels_(pixels: Tensor, cfg: Any, g: torch.Generator | None) -> Tensor:
    """In place on uint8 NHWC ``pixels`` (any device, any strides): camera faults on the samples that
    draw one. Returns ``pixels``; with ``cfg.camera == 0`` it draws nothing and touches nothing."""
    if not cfg.camera or pixels.shape[0] == 0:
        return pixels
    rows, faulted = _faulted(pixels, cfg, g)
    if rows.numel():
        pixels[rows] = faulted.to(pixels.device)
    return pixels


def fault_normalised_(x: Tensor, scale: Tensor, bias: Tensor, cfg: Any, g: torch.Generator | None) -> Tensor:
    """In place on a normalised float NCHW batch (``x = pixel * scale + bias``, clamped to the pixel
    range): its faulted samples rounded to 8-bit pixels, faulted and normalised back, so they match
    :func:`fault_pixels_` on the rounded batch. Returns ``x``."""
    if not cfg.camera or x.shape[0] == 0:
        return x
    pixels = ((x - bias) / scale).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    rows, faulted = _faulted(pixels, cfg, g)
    if rows.numel():
        x[rows] = faulted.to(x.device).permute(0, 3, 1, 2).float().mul_(scale).add_(bias)
    return x


def _faulted(pixels: Tensor, cfg: Any, g: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """The rows that drew a fault (int64, on ``pixels``' device) and their faulted uint8 NHWC pixels (CPU)."""
    hit, kind, severity, seed = draw(cfg, pixels.shape[0], g)
    rows = np.nonzero(hit)[0]
    if not len(rows):
        return torch.zeros(0, dtype=torch.int64, device=pixels.device), pixels[:0].cpu()
    index = torch.from_numpy(rows).to(pixels.device)
    chosen = pixels.index_select(0, index).cpu().contiguous().numpy()
    out = np.empty_like(chosen)
    rng = np.random.default_rng(seed)
    for k in np.unique(kind[rows]):  # fixed order: kind, then severity, each group one batched call
        for s in np.unique(severity[rows][kind[rows] == k]):
            group = (kind[rows] == k) & (severity[rows] == s)
            out[group] = apply_corruption(chosen[group], cfg.camera_kinds[k], int(s), rng)
    return index, torch.from_numpy(out)
