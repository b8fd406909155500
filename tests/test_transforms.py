"""Batch preprocessing and augmentation: shapes, determinism, flip rules, and train/serve agreement."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from signscale import corruptions
from signscale.labels import LabelSpace
from signscale.training.augment import WEATHER_KINDS, AugmentConfig, BatchAugment, LoaderAugment
from signscale.training.filters import blur_matrix, separable
from signscale.training.weather import WEATHER_EFFECTS
from signscale.transforms import Preprocess, to_input

SPACE = LabelSpace.for_country("de")
FLIP_MAP = SPACE.flip_map()
KEEP_RIGHT, KEEP_LEFT = SPACE.index("keep_right"), SPACE.index("keep_left")
SPEED_30, PRIORITY = SPACE.index("speed_limit_30"), SPACE.index("priority_road")

# Every sample gets at most one of blur, weather and erase; this makes all three common.
MANY_EFFECTS = {"blur": 0.3, "weather": 0.4, "erase": 0.3}

# Only the flip: every other op off, so the expected output can be written down exactly.
FLIP_ONLY = AugmentConfig(flip=1.0, rotate=0.0, scale=(1.0, 1.0), translate=0.0, perspective=0.0,
                          brightness=0.0, contrast=0.0, saturation=0.0, blur=0.0, weather=0.0, erase=0.0)


def images(n: int = 16, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def labels(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, len(SPACE), n)).long()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unnormalise(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """Normalised NCHW -> pixels in [0, 1]."""
    return x * torch.tensor(pre.std).view(1, 3, 1, 1) + torch.tensor(pre.mean).view(1, 3, 1, 1)


# -- Preprocess and to_input ------------------------------------------------------------------


def test_preprocess_round_trips_through_plain_data():
    pre = Preprocess(image_size=48, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    assert Preprocess.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    assert Preprocess.from_dict(Preprocess().to_dict()) == Preprocess()


def test_preprocess_reads_the_size_older_models_wrote_and_writes_image_size():
    old = {"size": 48, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    pre = Preprocess.from_dict(old)
    assert pre.image_size == 48 and pre.to_dict()["image_size"] == 48 and "size" not in pre.to_dict()
    assert Preprocess.from_dict(pre.to_dict()) == pre


def test_augment_config_round_trips_through_plain_data():
    cfg = AugmentConfig(rotate=5.0, scale=(0.95, 1.05), weather_kinds=("fog", "snow"), padding="border")
    assert AugmentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("kwargs, field", [({"std": (0.2, 0.0, 0.2)}, "std"), ({"image_size": 2}, "image_size")])
def test_preprocess_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Preprocess(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    ({"flip": 1.5}, "flip"), ({"weather_kinds": ("hail",)}, "weather_kinds"),
    ({"scale": (1.2, 0.9)}, "scale"), ({"perspective": 0.7}, "perspective"),
    ({"blur": 0.5, "weather": 0.4, "erase": 0.2}, "at most one"),
])
def test_augment_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**kwargs)


def test_to_input_is_float_nchw_normalised_per_channel():
    pre = Preprocess()
    x = images(4)
    out = to_input(x, pre)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 32, 32) and out.is_contiguous()
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    expected = (x.permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(out, expected)


def test_to_input_channels_last_has_the_same_values():
    out = to_input(images(4), Preprocess(), channels_last=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, to_input(images(4), Preprocess()))


def test_to_input_resizes_with_antialiasing():
    pre = Preprocess(image_size=32)
    x = images(3, size=64)
    out = to_input(x, pre)
    assert out.shape == (3, 3, 32, 32)
    ref = F.interpolate(x.permute(0, 3, 1, 2).float(), size=(32, 32), mode="bilinear", antialias=True)
    torch.testing.assert_close(unnormalise(out, pre) * 255, ref, atol=1e-3, rtol=0)
    flat = torch.full((1, 64, 64, 3), 200, dtype=torch.uint8)  # a flat image stays flat: no ringing
    torch.testing.assert_close(unnormalise(to_input(flat, pre), pre) * 255, torch.full((1, 3, 32, 32), 200.0))


def test_inputs_that_are_not_uint8_nhwc_are_refused():
    with pytest.raises(ValueError, match="uint8"):
        to_input(images(2).float(), Preprocess())
    with pytest.raises(ValueError, match="uint8"):
        to_input(images(2).permute(0, 3, 1, 2), Preprocess())


# -- BatchAugment: the contract ---------------------------------------------------------------


def test_disabled_augmentation_is_exactly_to_input():
    aug = BatchAugment(AugmentConfig(enabled=False), Preprocess(), FLIP_MAP)
    out, new = aug(images(), labels(), gen())
    assert torch.equal(out, to_input(images(), Preprocess()))
    assert torch.equal(new, labels())


def test_same_seed_same_output_and_another_seed_another():
    aug = BatchAugment(AugmentConfig(**MANY_EFFECTS), Preprocess(), FLIP_MAP)
    a, la = aug(images(64), labels(64), gen(7))
    b, lb = aug(images(64), labels(64), gen(7))
    assert torch.equal(a, b) and torch.equal(la, lb)
    fresh = BatchAugment(AugmentConfig(**MANY_EFFECTS), Preprocess(), FLIP_MAP)
    assert torch.equal(fresh(images(64), labels(64), gen(7))[0], a)  # no hidden state between calls
    c, _ = aug(images(64), labels(64), gen(8))
    assert not torch.equal(a, c)


def test_output_is_normalised_float_nchw_within_the_pixel_range():
    pre = Preprocess()
    aug = BatchAugment(AugmentConfig(**MANY_EFFECTS), pre, FLIP_MAP)
    out, new = aug(images(64), labels(64), gen())
    assert out.dtype == torch.float32 and out.shape == (64, 3, 32, 32) and out.is_contiguous()
    assert new.dtype == torch.int64 and new.shape == (64,)
    pixels = unnormalise(out, pre)
    assert torch.isfinite(out).all()
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert pixels.std() > 0.1  # still an image, not a wash


def test_augmentation_changes_images_when_enabled():
    x, y = images(32), labels(32)
    out, _ = BatchAugment(AugmentConfig(), Preprocess(), FLIP_MAP)(x, y, gen())
    changed = (out - to_input(x, Preprocess())).abs().flatten(1).amax(1) > 0.05
    assert changed.all()


def test_channels_last_output_has_the_same_values():
    cfg = AugmentConfig(weather=0.5)
    a, _ = BatchAugment(cfg, Preprocess(), FLIP_MAP)(images(), labels(), gen(3))
    b, _ = BatchAugment(cfg, Preprocess(), FLIP_MAP, channels_last=True)(images(), labels(), gen(3))
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)


def test_smaller_batches_after_larger_ones_are_unaffected_by_reused_buffers():
    aug = BatchAugment(AugmentConfig(), Preprocess(), FLIP_MAP)
    aug(images(64), labels(64), gen(1))
    small, _ = aug(images(5, seed=2), labels(5, seed=2), gen(3))
    fresh_aug = BatchAugment(AugmentConfig(), Preprocess(), FLIP_MAP)
    fresh, _ = fresh_aug(images(5, seed=2), labels(5, seed=2), gen(3))
    assert torch.equal(small, fresh)


def test_a_pickled_copy_augments_identically():
    aug = BatchAugment(AugmentConfig(), Preprocess(), FLIP_MAP)
    aug(images(), labels(), gen())  # fill the caches first: they must not travel
    copy = pickle.loads(pickle.dumps(aug))
    assert torch.equal(copy(images(), labels(), gen(5))[0], aug(images(), labels(), gen(5))[0])


def test_empty_batch_no_generator_and_bad_labels():
    aug = BatchAugment(AugmentConfig(), Preprocess(), FLIP_MAP)
    out, new = aug(images(0), labels(0), gen())
    assert out.shape == (0, 3, 32, 32) and new.shape == (0,)
    out, _ = aug(images(4), labels(4))  # no generator: torch's global one
    assert out.shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="class ids"):
        aug(images(2), torch.tensor([0, len(SPACE)]), gen())
    with pytest.raises(ValueError, match="labels"):
        aug(images(2), torch.tensor([0]), gen())


# -- flips follow the label space's rules -----------------------------------------------------


def test_the_flip_map_has_the_rules_these_tests_rely_on():
    assert FLIP_MAP[KEEP_RIGHT] == KEEP_LEFT and FLIP_MAP[SPEED_30] == -1 and FLIP_MAP[PRIORITY] == PRIORITY


def test_keep_right_is_mirrored_exactly_into_keep_left():
    x = images(1)
    out, new = BatchAugment(FLIP_ONLY, Preprocess(), FLIP_MAP)(x, torch.tensor([KEEP_RIGHT]), gen())
    assert new.tolist() == [KEEP_LEFT]
    assert torch.equal(out, to_input(x.flip(2), Preprocess()))  # a bit-exact mirror, then the usual inputs


def test_speed_limit_is_never_flipped():
    x = images(8)
    out, new = BatchAugment(FLIP_ONLY, Preprocess(), FLIP_MAP)(x, torch.full((8,), SPEED_30), gen())
    assert new.tolist() == [SPEED_30] * 8
    assert torch.equal(out, to_input(x, Preprocess()))


def test_symmetric_sign_is_mirrored_and_keeps_its_label():
    x = images(1)
    out, new = BatchAugment(FLIP_ONLY, Preprocess(), FLIP_MAP)(x, torch.tensor([PRIORITY]), gen())
    assert new.tolist() == [PRIORITY]
    assert torch.equal(out, to_input(x.flip(2), Preprocess()))


def test_mixed_batch_flips_each_sample_by_its_own_rule():
    x = images(3)
    y = torch.tensor([KEEP_RIGHT, SPEED_30, PRIORITY])
    out, new = BatchAugment(FLIP_ONLY, Preprocess(), FLIP_MAP)(x, y, gen())
    assert new.tolist() == [KEEP_LEFT, SPEED_30, PRIORITY]
    expected = to_input(torch.stack([x[0].flip(1), x[1], x[2].flip(1)]), Preprocess())
    assert torch.equal(out, expected)


def test_with_full_augmentation_flips_are_random_but_stay_within_the_rules():
    n = 2000
    y = torch.tensor([KEEP_RIGHT, SPEED_30, PRIORITY, SPACE.index("turn_left_ahead")]).repeat(n // 4)
    _, new = BatchAugment(AugmentConfig(), Preprocess(), FLIP_MAP)(images(n, size=8), y, gen())
    allowed = (new == y) | (new == torch.from_numpy(FLIP_MAP)[y])
    assert allowed.all()
    assert (new[y == SPEED_30] == SPEED_30).all()
    share = (new[y == KEEP_RIGHT] == KEEP_LEFT).float().mean().item()
    assert 0.4 < share < 0.6  # flip=0.5


def test_flip_at_48_px_is_a_mirror():
    pre = Preprocess(image_size=48)
    x = images(2, size=48)
    out, new = BatchAugment(FLIP_ONLY, pre, FLIP_MAP)(x, torch.tensor([KEEP_RIGHT, SPEED_30]), gen())
    assert new.tolist() == [KEEP_LEFT, SPEED_30]
    # 48 is not a power of two, so pixel centres are not exact binary fractions: equal to rounding
    torch.testing.assert_close(out, to_input(torch.stack([x[0].flip(1), x[1]]), pre), atol=1e-4, rtol=0)


# -- sizes, effects ---------------------------------------------------------------------------


@pytest.mark.parametrize("effect", ["blur", "weather", "erase"])
def test_every_effect_runs_at_48_px_and_from_a_larger_input(effect):
    cfg = AugmentConfig(weather_severity=5, **{"blur": 0.0, "weather": 0.0, "erase": 0.0, effect: 1.0})
    for pre, size in ((Preprocess(image_size=48), 48), (Preprocess(image_size=32), 64)):
        out, _ = BatchAugment(cfg, pre, FLIP_MAP)(images(16, size=size), labels(16), gen())
        assert out.shape == (16, 3, pre.image_size, pre.image_size) and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", WEATHER_KINDS)
def test_each_weather_kind_changes_the_image(kind):
    cfg = AugmentConfig(flip=0.0, rotate=0.0, scale=(1.0, 1.0), translate=0.0, perspective=0.0,
                        brightness=0.0, contrast=0.0, saturation=0.0, blur=0.0, erase=0.0, weather=1.0,
                        weather_kinds=(kind,), weather_severity=5)
    x = images(8)
    out, _ = BatchAugment(cfg, Preprocess(), FLIP_MAP)(x, labels(8), gen())
    clean = to_input(x, Preprocess())
    assert ((out - clean).abs().flatten(1).mean(1) > 0.02).all()


def test_weather_and_blur_follow_the_numpy_corruptions():
    """The torch effects reuse corruptions.py's tables; check the deterministic ones against it."""
    x = torch.from_numpy(np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32))
    nhwc = x.permute(0, 2, 3, 1).numpy()
    rng = np.random.default_rng(0)
    contrast, table = WEATHER_EFFECTS["contrast"]
    got = x.clone()
    contrast(got, table[x.device][torch.arange(5)], torch.zeros(5), None, 1.0)  # in place, severities 1..5
    for s in range(1, 6):
        want = corruptions.contrast(nhwc[s - 1:s], s, rng)
        np.testing.assert_allclose(got[s - 1].permute(1, 2, 0).numpy(), want[0], atol=1e-5)
    sigma = 2.0  # corruptions.blur picks its radius per sigma; at the radius used here they coincide
    bank = blur_matrix(torch.full((5,), sigma), x.shape[-1], max(1, math.ceil(2.5 * sigma)))  # square images
    np.testing.assert_allclose(separable(x, bank, bank).permute(0, 2, 3, 1).numpy(),
                               corruptions.gaussian_blur(nhwc, sigma), atol=1e-5)


# -- 8-bit pixels for loader workers ---------------------------------------------------------------


@pytest.mark.parametrize("extra", [{}, MANY_EFFECTS, {"padding": "zeros"}])
def test_pixels_are_the_float_augmentation_rounded_to_8_bits(extra):
    pre = Preprocess()
    aug = BatchAugment(AugmentConfig(**extra), pre, FLIP_MAP)
    x, y = images(64), labels(64)
    want, want_y = aug(x, y, gen(3))
    px, px_y = aug.pixels(x, y, gen(3))
    assert px.dtype == torch.uint8 and tuple(px.shape) == (64, 32, 32, 3)
    assert torch.equal(px_y, want_y)
    got = to_input(px, pre)
    half_level = (0.5 / (255 * torch.tensor(pre.std))).view(1, 3, 1, 1)
    err = (got - want).abs()
    assert (err <= half_level + 1e-4).all(), float((err - half_level).max())
    assert (err > 1e-3).any()  # really rounded: not a float batch in disguise


def test_pixels_without_augmentation_are_the_input_and_resize_like_to_input():
    off = BatchAugment(AugmentConfig(enabled=False), Preprocess(image_size=32), FLIP_MAP)
    x, y = images(8), labels(8)
    assert off.pixels(x, y)[0] is x
    bigger = images(8, size=48)
    px = off.pixels(bigger, y)[0]
    want = to_input(bigger, Preprocess(image_size=32))
    assert (to_input(px, Preprocess(image_size=32)) - want).abs().max() <= 0.5 / (255 * min(Preprocess().std)) + 1e-4


def test_pixels_keep_the_flip_rules_exactly():
    aug = BatchAugment(FLIP_ONLY, Preprocess(), FLIP_MAP)
    x = images(3)
    px, y = aug.pixels(x, torch.tensor([KEEP_RIGHT, SPEED_30, PRIORITY]), gen(0))
    assert y.tolist() == [KEEP_LEFT, SPEED_30, PRIORITY]
    assert torch.equal(px[0], x[0].flip(1)) and torch.equal(px[1], x[1]) and torch.equal(px[2], x[2].flip(1))


def test_loader_augment_is_seeded_by_the_batch_and_survives_pickling():
    make = LoaderAugment(BatchAugment(AugmentConfig(**MANY_EFFECTS), Preprocess(), FLIP_MAP))
    twin = pickle.loads(pickle.dumps(make))

    def batch(seed: int) -> dict:
        return {"image": images(32), "meta": torch.stack([torch.arange(32), labels(32)], 1), "seed": seed}

    a, b, c = make(batch(7)), twin(batch(7)), make(batch(8))
    assert a["augmented"] and a["image"].dtype == torch.uint8
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["meta"], b["meta"])
    assert not torch.equal(a["image"], c["image"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_gpu_and_is_deterministic_there():
    aug = BatchAugment(AugmentConfig(**MANY_EFFECTS), Preprocess(), FLIP_MAP)
    x, y = images(64).cuda(), labels(64).cuda()
    a, la = aug(x, y, torch.Generator(device="cuda").manual_seed(1))
    b, lb = aug(x, y, torch.Generator(device="cuda").manual_seed(1))
    assert a.is_cuda and la.is_cuda and torch.equal(a, b) and torch.equal(la, lb)
    out, new = BatchAugment(FLIP_ONLY, Preprocess(), FLIP_MAP)(x[:1], torch.tensor([KEEP_RIGHT]).cuda(), None)
    assert new.tolist() == [KEEP_LEFT]
    torch.testing.assert_close(out, to_input(x[:1].flip(2), Preprocess()), atol=1e-5, rtol=0)
