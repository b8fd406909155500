"""Corruptions: the spatial scale of a condition follows the image by default, or the caller's ``scale``."""

import numpy as np
import pytest

from signscale.corruptions import CORRUPTIONS, apply_corruption


def _line_image(size: int) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    img[:, size // 2] = 255  # one bright column: its spread measures the blur
    return img


def _spread(img: np.ndarray) -> int:
    """How many columns of the middle row a blur has lit."""
    return int((img[img.shape[0] // 2, :, 0] > 0).sum())


def test_blur_grows_with_the_image_by_default_and_follows_an_explicit_scale():
    rng = np.random.default_rng(0)
    crop = _spread(apply_corruption(_line_image(32), "blur", 3, rng))
    scene_default = _spread(apply_corruption(_line_image(256), "blur", 3, rng))
    scene_scaled = _spread(apply_corruption(_line_image(256), "blur", 3, rng, scale=1.0))
    assert scene_default > 4 * crop  # 8x the image, so ~8x the sigma
    assert scene_scaled == crop  # the same blur in pixels as on the 32 px crop


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_every_kind_takes_a_scale_and_keeps_the_shape(kind):
    img = np.random.default_rng(1).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    out = apply_corruption(img, kind, 4, np.random.default_rng(2), scale=0.75)
    assert out.shape == img.shape and out.dtype == np.uint8


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_a_bad_scale_is_refused_with_the_field_named(bad):
    with pytest.raises(ValueError, match="scale"):
        apply_corruption(_line_image(32), "snow", 1, np.random.default_rng(0), scale=bad)
