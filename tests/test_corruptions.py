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


# ---------------------------------------------------------------------------------------------
# Camera faults: evaluation-only kinds, appended after the weather (whose seeds must not move)


def _sign(size: int = 32) -> np.ndarray:
    from signscale.data.sources.pictograms import render_clean

    return render_clean(14, size)


def test_camera_faults_are_appended_after_the_weather_kinds():
    from signscale.corruptions import CAMERA_FAULTS, KINDS

    assert CAMERA_FAULTS == ("jpeg", "motion_blur", "low_light", "defocus", "lens_rain")
    assert KINDS[:len(CORRUPTIONS)] == CORRUPTIONS and KINDS[len(CORRUPTIONS):] == CAMERA_FAULTS
    assert not set(CAMERA_FAULTS) & set(CORRUPTIONS)  # the dataset condition names stay as they were


@pytest.mark.parametrize("kind", ["jpeg", "motion_blur", "low_light", "defocus", "lens_rain"])
def test_camera_faults_are_deterministic_by_seed_and_keep_shape_and_dtype(kind):
    one = _sign(32)
    batch = np.stack([_sign(48)[:40], _sign(48)[8:]])  # non-square, 2 images
    for img in (one, batch):
        for severity in (1, 3, 5):
            a = apply_corruption(img, kind, severity, np.random.default_rng(7))
            b = apply_corruption(img, kind, severity, np.random.default_rng(7))
            assert a.shape == img.shape and a.dtype == np.uint8
            assert np.array_equal(a, b)
            assert not np.array_equal(a, img)  # it does something at every severity
    # worse with severity: further from the clean image at 5 than at 1
    mild = np.abs(apply_corruption(one, kind, 1, np.random.default_rng(0)).astype(int) - one).mean()
    severe = np.abs(apply_corruption(one, kind, 5, np.random.default_rng(0)).astype(int) - one).mean()
    assert severe > mild


@pytest.mark.parametrize("kind", ["motion_blur", "low_light", "lens_rain"])
def test_random_camera_faults_depend_on_the_seed(kind):
    img = _sign(32)
    a = apply_corruption(img, kind, 3, np.random.default_rng(1))
    b = apply_corruption(img, kind, 3, np.random.default_rng(2))
    assert not np.array_equal(a, b)


def test_evaluation_takes_the_camera_faults_and_all_of_them():
    from signscale.config import ConfigError
    from signscale.corruptions import KINDS
    from signscale.evaluation.evaluate import EvalConfig

    assert EvalConfig(model="m", corruptions=("all",)).corruption_kinds() == KINDS
    assert EvalConfig(model="m", corruptions=("lens_rain", "jpeg")).corruption_kinds() == ("jpeg", "lens_rain")
    with pytest.raises(ConfigError, match="low_light"):
        EvalConfig(model="m", corruptions=("lowlight",))
