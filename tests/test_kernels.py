"""The compiled CPU kernels against the reference code they replace: the torch augmentation path
and the numpy permutation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("numba", reason="the compiled kernels need numba (a dependency of signscale)")

from signscale import kernels
from signscale.data import permutation
from signscale.labels import LabelSpace
from signscale.training.augment import WEATHER_KINDS, AugmentConfig, BatchAugment, LoaderAugment
from signscale.transforms import Preprocess

FLIP_MAP = LabelSpace.for_country("de").flip_map()
STILL = {"rotate": 0.0, "scale": (1.0, 1.0), "translate": 0.0, "perspective": 0.0, "brightness": 0.0,
         "contrast": 0.0, "saturation": 0.0, "blur": 0.0, "weather": 0.0, "erase": 0.0}


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Random but locally smooth crops, like real ones (white noise makes every rounding visible)."""
    x = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8))
    x = torch.nn.functional.avg_pool2d(x.float(), 3, 1, 1).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()


def both_paths(cfg: AugmentConfig, x: torch.Tensor, y: torch.Tensor, seed: int = 3):
    size = x.shape[1]
    fast = BatchAugment(cfg, Preprocess(image_size=size), FLIP_MAP, compiled=True)
    slow = BatchAugment(cfg, Preprocess(image_size=size), FLIP_MAP, compiled=False)
    return fast.pixels(x, y, torch.Generator().manual_seed(seed)), slow.pixels(
        x, y, torch.Generator().manual_seed(seed)
    )


def assert_same_pixels(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float rounding: a grey level at most, on a tiny share of the values."""
    diff = (a.int() - b.int()).abs()
    assert int(diff.max()) <= 1
    assert float((diff > 0).float().mean()) < 1e-3


CASES = [
    {},  # the defaults: every op, and each occasional effect on some samples
    {"padding": "zeros", "scale": (0.6, 0.8)},  # zoomed out: much of the output is padding
    {"padding": "reflection", "scale": (0.6, 0.8), "rotate": 30.0},
    {"blur": 1.0, "weather": 0.0, "erase": 0.0},
    {"erase": 1.0, "weather": 0.0, "blur": 0.0},
    *({"weather": 1.0, "blur": 0.0, "erase": 0.0, "weather_kinds": (k,), "weather_severity": 5}
      for k in WEATHER_KINDS),
    {"weather": 1.0, "blur": 0.0, "erase": 0.0, "weather_kinds": ("snow", "fog", "night")},  # another draw order
    {"weather": 1.0, "blur": 0.0, "erase": 0.0, "weather_kinds": ("night", "fog", "night")},  # night weighted 2
    {"hue": 180.0, "colour_cast": 0.5, "grayscale": 0.3},  # the design re-coloured, with every other op
    {"hue": 60.0, "colour_cast": 0.3, "padding": "zeros", "scale": (0.6, 0.8)},  # the ring through the style
]


@pytest.mark.parametrize("size", [24, 32, 64])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "defaults")
def test_kernel_gives_the_torch_paths_pixels_and_labels(case, size):
    x = smooth_images(48, size)
    y = torch.from_numpy(np.random.default_rng(1).integers(0, len(FLIP_MAP), 48))
    (fast, fast_y), (slow, slow_y) = both_paths(AugmentConfig(**case), x, y)
    assert fast.shape == slow.shape == (48, size, size, 3) and fast.dtype == torch.uint8
    assert torch.equal(fast_y, slow_y)
    assert_same_pixels(fast, slow)
    assert not torch.equal(fast, x)


def test_identity_geometry_copies_pixels_exactly_and_a_flip_is_an_exact_mirror():
    x = smooth_images(8, 32)
    never = np.full(len(FLIP_MAP), -1)  # geometry on (flip probability 1) but no class may flip
    aug = BatchAugment(AugmentConfig(flip=1.0, **STILL), Preprocess(), never, compiled=True)
    assert torch.equal(aug.pixels(x, torch.zeros(8, dtype=torch.long), torch.Generator())[0], x)
    aug = BatchAugment(AugmentConfig(flip=1.0, **STILL), Preprocess(), np.arange(len(FLIP_MAP)), compiled=True)
    assert torch.equal(aug.pixels(x, torch.zeros(8, dtype=torch.long), torch.Generator())[0], x.flip(2))


def test_strided_input_and_shared_output():
    x = smooth_images(16, 32)
    strided = torch.stack([x, x], dim=3)[:, :, :, 0]  # the same pixels, not contiguous
    assert not strided.is_contiguous() and torch.equal(strided, x)
    aug = BatchAugment(AugmentConfig(), Preprocess(), FLIP_MAP, compiled=True)
    y = torch.zeros(16, dtype=torch.long)
    a, _ = aug.pixels(x, y, torch.Generator().manual_seed(0))
    b, _ = aug.pixels(strided, y, torch.Generator().manual_seed(0), shared=True)
    assert torch.equal(a, b)
    assert b.is_shared() and not a.is_shared()


def test_loader_augment_compiles_the_kernel_up_front():
    LoaderAugment(BatchAugment(AugmentConfig(), Preprocess(), FLIP_MAP, compiled=True))
    assert kernels._kernel(32, 32).signatures  # machine code in the process that forks the workers


@pytest.mark.parametrize("n", [2, 3, 100, 2048, 50_000_000])
def test_compiled_permutation_is_the_numpy_one(n):
    rng = np.random.default_rng(n)
    x = rng.integers(0, n, 3000)
    keys = rng.integers(0, 2**63, 3000).astype(np.uint64)
    assert np.array_equal(
        permutation.permute(x, n, keys, compiled=True), permutation.permute(x, n, keys, compiled=False)
    )
    assert np.array_equal(permutation.permute(x, n, 42, compiled=True), permutation.permute(x, n, 42, compiled=False))
    if n <= 2048:
        whole = permutation.permute(np.arange(n), n, 7, compiled=True)
        assert sorted(whole.tolist()) == list(range(n))  # a bijection of [0, n)
