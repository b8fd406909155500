"""Re-colouring a sign's design in training (hue, colour cast, grayscale): what each does to the
pixels, on both augmentation paths, and that the other draws stay as they were."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from signscale.labels import LabelSpace
from signscale.training.augment import AugmentConfig, BatchAugment
from signscale.training.colour import LUMA, lighting_matrices, style_matrices
from signscale.transforms import Preprocess

COVERS = ("signscale.training.geometry",)

FLIP_MAP = LabelSpace.for_country("de").flip_map()
# No geometry, no lighting, no occasional effect: the colour step alone (the torch path).
STILL = {"rotate": 0.0, "scale": (1.0, 1.0), "translate": 0.0, "perspective": 0.0, "flip": 0.0, "brightness": 0.0,
         "contrast": 0.0, "saturation": 0.0, "blur": 0.0, "weather": 0.0, "erase": 0.0}


def mid_images(n: int = 24, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Colours in [100, 150], so that a hue rotation never leaves [0, 255]; one grey pixel per image."""
    x = np.random.default_rng(seed).integers(100, 151, (n, size, size, 3), dtype=np.uint8)
    x[:, 0, 0, :] = 128
    return torch.from_numpy(x)


def run(cfg: AugmentConfig, x: torch.Tensor, *, compiled: bool, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.from_numpy(np.random.default_rng(1).integers(0, len(FLIP_MAP), x.shape[0]))
    aug = BatchAugment(cfg, Preprocess(image_size=x.shape[1]), FLIP_MAP, compiled=compiled)
    return aug.pixels(x, y, torch.Generator().manual_seed(seed))


def test_hue_rotation_changes_the_paint_not_the_lightness_and_keeps_greys_grey():
    x = mid_images()
    out, _ = run(AugmentConfig(hue=120.0, **STILL), x, compiled=False)
    sums_in, sums_out = x.int().sum(-1), out.int().sum(-1)
    assert int((sums_in - sums_out).abs().max()) <= 2  # rounding of three channels
    assert int((out[:, 0, 0, :].int() - 128).abs().max()) <= 1
    moved = (out.int() - x.int()).abs().amax(-1) > 4
    assert float(moved.float().mean()) > 0.5


def test_a_half_turn_of_hue_turns_red_cyan_and_a_cast_turns_white_yellow_or_other_tints():
    turned = style_matrices(torch.tensor([math.pi]), torch.ones(1, 3))[0] @ torch.tensor([1.0, 0.0, 0.0])
    assert torch.allclose(turned, torch.tensor([-1 / 3, 2 / 3, 2 / 3]), atol=1e-6)
    white = torch.full((16, 32, 32, 3), 160, dtype=torch.uint8)  # no gain clamps it
    out, _ = run(AugmentConfig(colour_cast=0.5, **STILL), white, compiled=False)
    spread = out.int().amax(-1) - out.int().amin(-1)  # 0 for a neutral pixel
    assert int(spread.amin()) > 0 and float(spread.float().mean()) > 30
    assert torch.equal(out, out[:, :1, :1, :].expand_as(out))  # one gain per image, the same everywhere


@pytest.mark.parametrize("compiled", [False, True])
def test_grayscale_gives_grey_pixels_and_keeps_the_other_draws(compiled):
    if compiled:
        pytest.importorskip("numba")
    x = mid_images(seed=2)
    cfg = {"weather": 0.0, "blur": 0.3, "erase": 0.0}  # geometry and lighting: the kernel's case; no coloured occluder
    grey, grey_y = run(AugmentConfig(grayscale=1.0, **cfg), x, compiled=compiled)
    plain, plain_y = run(AugmentConfig(**cfg), x, compiled=compiled)
    assert int((grey.int().amax(-1) - grey.int().amin(-1)).max()) <= 1
    assert torch.equal(grey_y, plain_y)  # the same flips: the style's draws come after the others
    # Grayscale is saturation 0, which keeps each pixel's luma: the grey value is the plain output's
    # luma (where nothing was clamped), up to rounding.
    luma = (plain.float() * torch.tensor(LUMA)).sum(-1)
    inside = (plain.int().amax(-1) < 255) & (plain.int().amin(-1) > 0)
    assert float((grey[..., 0].float() - luma)[inside].abs().max()) <= 1.5


def test_the_lighting_matrix_pulls_towards_luma_and_a_style_off_is_the_identity():
    luma = torch.tensor(LUMA)
    matrix, shift = lighting_matrices(torch.ones(1), torch.ones(1), torch.zeros(1), luma)
    assert torch.allclose(matrix[0], luma.expand(3, 3)) and float(shift[0]) == 0.0
    identity = style_matrices(torch.zeros(2), torch.ones(2, 3))
    assert torch.equal(identity, torch.eye(3).expand(2, 3, 3))


@pytest.mark.parametrize(("field", "value", "words"), [
    ("hue", 200.0, "hue: degrees"), ("colour_cast", 1.0, "colour_cast: must be in"),
    ("grayscale", 1.5, "grayscale: a probability"),
])
def test_bad_style_settings_are_named(field, value, words):
    with pytest.raises(ValueError, match=words):
        AugmentConfig(**{field: value})


def test_grayscale_refuses_zeros_padding_and_says_what_to_use():
    with pytest.raises(ValueError, match="grayscale with padding=zeros.*padding=border"):
        AugmentConfig(grayscale=0.2, padding="zeros")
