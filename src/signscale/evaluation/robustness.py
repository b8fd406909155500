"""Robustness: corrupted copies of an evaluation batch (every corruption kind at every severity,
deterministic per sample id), grouped into passes that keep one batch's copies under a memory budget."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from signscale.corruptions import KINDS, apply_corruption

# Corrupted copies travel from the loader workers with their batch; passes are split so that one
# batch's copies stay under this size (at 32 px and batch 512, 85 corruption x severity pairs fit: all 65 do).
VARIANT_BUDGET_BYTES = 128 << 20

# Accuracy under each fault is also split by how bright the clean image was (its mean Rec. 601 luma,
# 0..1): night and low light take the sign from images that were dark to begin with and leave the rest
# (docs/training.md), which a single accuracy hides. Inner edges of the bins; the outer are 0 and 1.
BRIGHTNESS_EDGES = (0.1, 0.2, 0.3, 0.5)
BRIGHTNESS_BINS = len(BRIGHTNESS_EDGES) + 1
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def brightness_bins(images_nhwc: np.ndarray) -> np.ndarray:
    """The brightness bin (0..BRIGHTNESS_BINS - 1) of each uint8 NHWC image; a mean on an edge goes up."""
    x = np.asarray(images_nhwc, dtype=np.float32).reshape(len(images_nhwc), -1, 3)
    mean = (x @ _LUMA).mean(axis=1) / 255.0
    return np.digitize(mean, BRIGHTNESS_EDGES).astype(np.int64)


def bin_counts(bins: np.ndarray, hits: np.ndarray) -> np.ndarray:
    """[BRIGHTNESS_BINS, 2] (images, correct) of one batch, from each image's bin and whether it was right."""
    return np.stack([np.bincount(bins, minlength=BRIGHTNESS_BINS),
                     np.bincount(bins, weights=hits.astype(np.int64), minlength=BRIGHTNESS_BINS).astype(np.int64)],
                    axis=1)


def corrupt_batch(images_nhwc: np.ndarray, ids: Sequence[int] | np.ndarray, *, corruption: str, severity: int,
                  seed: int) -> np.ndarray:
    """Corrupt each uint8 image with its own generator, seeded by (seed, corruption index, severity, id).

    One image at a time, on purpose: every corruption draws its randomness for the whole array it
    is given, so a batched call would make a sample's pixels depend on its neighbours.
    """
    k = KINDS.index(corruption)  # the weather kinds first, as before the camera faults were added
    out = np.empty_like(images_nhwc)
    for j, (img, i) in enumerate(zip(images_nhwc, np.asarray(ids, dtype=np.int64))):
        out[j] = apply_corruption(img, corruption, severity, np.random.default_rng([seed, k, severity, int(i)]))
    return out


def with_variants(batch: dict[str, Any], pairs: Sequence[tuple[str, int]], seed: int) -> dict[str, Any]:
    """Attach ``variants`` [P, B, H, W, 3]: the batch under each (corruption, severity) pair."""
    if pairs:
        imgs, ids = batch["image"].numpy(), batch["id"].numpy()
        batch["variants"] = torch.from_numpy(np.stack([corrupt_batch(imgs, ids, corruption=c, severity=s, seed=seed)
                                                       for c, s in pairs]))
    return batch


def pair_groups(pairs: list[tuple[str, int]], batch_size: int, image_size: int) -> list[list[int]]:
    """Pair indices per data pass, so one batch's corrupted copies stay within VARIANT_BUDGET_BYTES."""
    per_pass = max(1, VARIANT_BUDGET_BYTES // max(1, batch_size * image_size * image_size * 3))
    idx = list(range(len(pairs)))
    return [idx[i:i + per_pass] for i in range(0, len(idx), per_pass)]
