"""Mixup and CutMix: a training batch blended with a shuffled copy of itself, its targets in proportion.

Mixing comes after augmentation, whose flips already renamed the classes a mirror turns into another
(``keep_left`` <-> ``keep_right``), so a mixed target names the classes the pixels show. Each batch draws
its mixing from its own seed, so a resumed run mixes exactly as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Mixing:
    """Beta(alpha, alpha) draws of the share an image keeps; 0 turns a kind off. With both on, each batch
    uses one of them, chosen evenly."""

    mixup: float = 0.0
    cutmix: float = 0.0

    def __post_init__(self) -> None:
        for name in ("mixup", "cutmix"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: the Beta distribution's alpha must be >= 0 (0: off), "
                                 f"got {getattr(self, name)}")

    @property
    def enabled(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


def mix(x: Tensor, y: Tensor, num_classes: int, cfg: Mixing, seed: int) -> tuple[Tensor, Tensor]:
    """(mixed NCHW batch, [B, num_classes] target probabilities) for an NCHW batch and its class ids."""
    rng = np.random.default_rng([seed, 0x6D6978])  # apart from the augmentation's draws of the same seed
    kinds = [k for k in ("mixup", "cutmix") if getattr(cfg, k) > 0]
    kind = kinds[int(rng.integers(len(kinds)))]
    keep = float(rng.beta(getattr(cfg, kind), getattr(cfg, kind)))
    perm = torch.from_numpy(rng.permutation(len(y))).to(x.device)
    if kind == "mixup":
        x = x * keep + x[perm] * (1 - keep)
    else:
        x, keep = _paste_box(x, perm, keep, rng)
    one_hot = F.one_hot(y, num_classes).to(torch.float32)
    return x, one_hot * keep + one_hot[perm] * (1 - keep)


def _paste_box(x: Tensor, perm: Tensor, keep: float, rng: np.random.Generator) -> tuple[Tensor, float]:
    """CutMix: a box of ``1 - keep`` of the area, at a uniform centre and clipped to the image, taken from
    the shuffled batch; the share kept is recomputed from the clipped box."""
    h, w = x.shape[-2:]
    side = np.sqrt(1.0 - keep)
    bh, bw = int(round(h * side)), int(round(w * side))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = max(cy - bh // 2, 0), min(cy + bh - bh // 2, h)
    x0, x1 = max(cx - bw // 2, 0), min(cx + bw - bw // 2, w)
    x = x.clone()
    x[..., y0:y1, x0:x1] = x[perm, :, y0:y1, x0:x1]
    return x, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
