"""Test-time augmentation by horizontal flip that keeps to the label space's flip rules.

A blind flip averages a ``keep_right`` image with a mirror image that shows ``keep_left``, and a
``speed_limit_30`` with a "03" that is no sign at all. Here the second view is the mirror image, and
its probabilities are read through :meth:`signscale.labels.LabelSpace.flip_map` (``m[c]``: the class
a mirrored image of class ``c`` shows, -1 for "never flip"):

* an image is flipped only when the first view's top class may be flipped (``m[top] >= 0``): an image
  that looks like a ``never`` class is scored on its own, so TTA cannot hurt those classes;
* otherwise class ``c`` gets the mean of ``p[c]`` (plain view) and ``q[m[c]]`` (the mirrored view's
  probability of the class ``c`` turns into: ``keep_left`` for a ``keep_right``); a ``never`` class
  keeps ``p[c]``, since the mirror image says nothing about it; the row is then renormalised.

The predictor (so ``predict`` and ``serve``) and the evaluator both call :func:`combine`, so a
report scored with ``tta`` describes what a service started with ``tta`` answers.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["combine", "flip_images", "needs_flip"]


def flip_images(images_nhwc: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """The horizontal mirror of an NHWC batch (a contiguous copy)."""
    if isinstance(images_nhwc, np.ndarray):
        return np.ascontiguousarray(images_nhwc[:, :, ::-1])
    return images_nhwc.flip(2).contiguous()


def needs_flip(probs: torch.Tensor, flip_map: torch.Tensor) -> torch.Tensor:
    """[N] bool: rows whose top class may be flipped, the only ones a second view can help."""
    return flip_map.to(probs.device)[probs.argmax(1)] >= 0


def combine(probs: torch.Tensor, flipped_probs: torch.Tensor, flip_map: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Probabilities [N, C] from the plain view ``probs`` and the mirrored view ``flipped_probs`` (see above).

    Rows whose top class is a ``never`` class come back unchanged; the others sum to 1.
    """
    fm = torch.as_tensor(flip_map, dtype=torch.int64, device=probs.device)
    if fm.shape != (probs.shape[1],):
        raise ValueError(f"flip_map: expected {probs.shape[1]} entries (one per class), got {tuple(fm.shape)}")
    flippable = fm >= 0
    mapped = flipped_probs.index_select(1, fm.clamp(min=0))  # mapped[:, c] = q[:, m[c]]
    both = torch.where(flippable[None, :], (probs + mapped) / 2, probs)
    both = both / both.sum(1, keepdim=True).clamp(min=torch.finfo(both.dtype).tiny)
    return torch.where(needs_flip(probs, fm)[:, None], both, probs)
