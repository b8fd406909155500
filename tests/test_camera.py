"""Camera faults in training augmentation (signscale.training.camera through BatchAugment): off by
default and then inert, deterministic by seed on both paths, shapes and dtypes kept, the faults are
signscale.corruptions' own, and a bad config names its field."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from signscale import config, corruptions
from signscale.labels import LabelSpace
from signscale.training import camera
from signscale.training.augment import AugmentConfig, BatchAugment, LoaderAugment
from signscale.training.train import TrainConfig, train
from signscale.transforms import Preprocess, to_input

FLIP_MAP = LabelSpace.for_country("de").flip_map()
# every other effect off: the faults are then the only change, and the output can be written down
PLAIN = dict(rotate=0.0, scale=(1.0, 1.0), translate=0.0, perspective=0.0, flip=0.0, brightness=0.0, contrast=0.0,
             saturation=0.0, blur=0.0, weather=0.0, erase=0.0)


def images(n: int = 32, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random images (a few colour blocks upsampled): blur and JPEG visibly change them,
    unlike white noise, whose mean a blur keeps."""
    coarse = np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(coarse.repeat(size // 4, 1).repeat(size // 4, 2)))


def labels(n: int = 32) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64)  # speed_limit_20: never flipped


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def augment(**kw) -> BatchAugment:
    return BatchAugment(AugmentConfig(**kw), Preprocess(), FLIP_MAP)


@pytest.mark.parametrize("compiled", [None, False])  # the kernel (where numba imports) and the torch ops
def test_off_by_default_and_then_inert(compiled):
    assert AugmentConfig().camera == 0.0
    x, y = images(), labels()
    default = BatchAugment(AugmentConfig(), Preprocess(), FLIP_MAP, compiled=compiled)
    other = BatchAugment(AugmentConfig(camera=0.0, camera_kinds=("jpeg",), camera_severity=(5, 5)),
                         Preprocess(), FLIP_MAP, compiled=compiled)
    for method in ("pixels", "__call__"):
        ga, gb = gen(4), gen(4)
        a, b = getattr(default, method)(x, y, ga), getattr(other, method)(x, y, gb)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(ga.get_state(), gb.get_state())


def test_off_draws_nothing_and_touches_nothing():
    g, x = gen(1), images()
    before, state = x.clone(), g.get_state()
    assert camera.fault_pixels_(x, AugmentConfig(), g) is x
    assert torch.equal(x, before) and torch.equal(g.get_state(), state)
    f = to_input(x, Preprocess())
    kept = f.clone()
    scale, bias = Preprocess().scale_bias(torch.device("cpu"))
    assert camera.fault_normalised_(f, scale, bias, AugmentConfig(), g) is f
    assert torch.equal(f, kept) and torch.equal(g.get_state(), state)


@pytest.mark.parametrize("method", ["pixels", "__call__"])
def test_same_seed_same_output_another_seed_another(method):
    aug, x, y = augment(camera=0.5, camera_severity=(1, 5)), images(), labels()
    a, b, c = (getattr(aug, method)(x, y, gen(s))[0] for s in (7, 7, 8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    twin = pickle.loads(pickle.dumps(aug))  # a loader worker's copy
    assert torch.equal(getattr(twin, method)(x, y, gen(7))[0], a)


@pytest.mark.parametrize("size", [32, 48])
def test_shapes_and_dtypes_are_kept(size):
    x, y = images(size=size), labels()
    pre = Preprocess(image_size=size)
    for channels_last in (False, True):
        aug = BatchAugment(AugmentConfig(camera=1.0), pre, FLIP_MAP, channels_last=channels_last)
        px, py = aug.pixels(x, y, gen())
        assert px.dtype == torch.uint8 and tuple(px.shape) == (32, size, size, 3) and torch.equal(py, y)
        f, fy = aug(x, y, gen())
        assert f.dtype == torch.float32 and tuple(f.shape) == (32, 3, size, size) and torch.equal(fy, y)
        assert f.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert (f >= to_input(torch.zeros_like(x[:1]), pre) - 1e-5).all()  # still within the pixel range
        assert (f <= to_input(torch.full_like(x[:1], 255), pre) + 1e-5).all()


@pytest.mark.parametrize("kind", corruptions.CAMERA_FAULTS)
def test_p1_changes_every_image_with_each_kind(kind):
    x, y = images(), labels()
    off, _ = augment().pixels(x, y, gen(2))
    on, _ = augment(camera=1.0, camera_kinds=(kind,), camera_severity=(3, 3)).pixels(x, y, gen(2))
    changed = (on != off).flatten(1).any(1)
    assert changed.all(), f"{kind}: {int((~changed).sum())} of {len(x)} images unchanged"


def test_faults_come_last_and_leave_every_other_draw_as_it_was():
    x, y = images(64), labels(64)
    off, _ = augment(**dict(blur=0.3, weather=0.3, erase=0.3)).pixels(x, y, gen(5))
    on, _ = augment(**dict(blur=0.3, weather=0.3, erase=0.3), camera=0.5).pixels(x, y, gen(5))
    hit = torch.from_numpy(camera.draw(AugmentConfig(camera=0.5), 64, _after_augmentation(x, y, 5))[0])
    assert 10 < int(hit.sum()) < 54  # about half
    changed = (on != off).flatten(1).any(1)
    assert torch.equal(changed, hit)  # exactly the rows that drew a fault, the others byte-identical


def _after_augmentation(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Generator:
    """A generator in the state the camera faults find it: after the augmentation's own draws."""
    g = gen(seed)
    augment(**dict(blur=0.3, weather=0.3, erase=0.3)).pixels(x, y, g)
    return g


def test_a_kind_listed_twice_is_drawn_twice_as_often():
    cfg = AugmentConfig(camera=1.0, camera_kinds=("low_light", "jpeg", "low_light"))
    hit, kind, _, _ = camera.draw(cfg, 30_000, gen(5))
    assert hit.all()
    names = np.array(cfg.camera_kinds)[kind]
    assert abs(float(np.mean(names == "low_light")) - 2 / 3) < 0.02  # sd of the share: 0.003


def test_the_faults_are_the_corruptions_own():
    x, y = images(), labels()
    assert torch.equal(augment(**PLAIN).pixels(x, y, gen())[0], x)  # nothing else changes the pixels
    # JPEG draws no random numbers, so the expected pixels do not depend on the seed drawn
    jpeg = augment(**PLAIN, camera=1.0, camera_kinds=("jpeg",), camera_severity=(2, 2))
    want = corruptions.apply_corruption(x.numpy(), "jpeg", 2, np.random.default_rng(0))
    assert np.array_equal(jpeg.pixels(x, y, gen())[0].numpy(), want)
    want_float = to_input(torch.from_numpy(want), Preprocess())
    torch.testing.assert_close(jpeg(x, y, gen())[0], want_float, atol=1e-5, rtol=0)


@pytest.mark.parametrize("compiled", [None, False])
def test_both_paths_fault_the_same_rows_alike(compiled):
    pre = Preprocess()
    aug = BatchAugment(AugmentConfig(camera=0.5, camera_severity=(1, 5)), pre, FLIP_MAP, compiled=compiled)
    x, y = images(64), labels(64)
    px, _ = aug.pixels(x, y, gen(9))
    f, _ = aug(x, y, gen(9))
    err = (to_input(px, pre) - f).abs().flatten(1)
    # rounding aside (half a grey level before the fault), the two paths give the same images; a
    # grey level's difference can move a JPEG block, so faulted rows agree on average, not per pixel
    assert float(err.mean(1).max()) < 0.05, err.mean(1).max()
    assert float(err.mean()) < 0.01


def test_loader_augment_with_faults_is_seeded_by_the_batch():
    make = LoaderAugment(augment(camera=0.5))

    def batch(seed: int) -> dict:
        return {"image": images(), "meta": torch.stack([torch.arange(32), labels()], 1), "seed": seed}

    a, b, c = make(batch(3)), pickle.loads(pickle.dumps(make))(batch(3)), make(batch(4))
    assert a["image"].dtype == torch.uint8 and torch.equal(a["image"], b["image"])
    assert not torch.equal(a["image"], c["image"])


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"camera": 1.5}, "camera:"),
    ({"camera": -0.1}, "camera:"),
    ({"camera_kinds": ("jpeg", "fog")}, "camera_kinds"),
    ({"camera": 0.2, "camera_kinds": ()}, "camera_kinds"),
    ({"camera_severity": (0, 3)}, "camera_severity"),
    ({"camera_severity": (4, 2)}, "camera_severity"),
    ({"camera_severity": (1, 6)}, "camera_severity"),
])
def test_a_bad_value_is_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**kwargs)


def test_a_bad_kind_from_the_command_line_is_named_with_the_valid_ones():
    with pytest.raises(ValueError) as e:  # the CLI's --augment.camera-kinds jpeg,blurr
        config.load(TrainConfig, overrides=["augment.camera=0.3", "augment.camera-kinds=jpeg,blurr"])
    assert "camera_kinds" in str(e.value) and "motion_blur" in str(e.value) and "blurr" in str(e.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_path_on_the_gpu_is_deterministic():
    aug, x, y = augment(camera=0.5), images().cuda(), labels().cuda()
    a, b = (aug(x, y, torch.Generator(device="cuda").manual_seed(3))[0] for _ in range(2))
    assert a.is_cuda and torch.equal(a, b)


@pytest.mark.parametrize("workers", [0, 1])  # the device path, and the loader workers' pixels
def test_training_with_camera_faults_runs(synthetic_dataset, tmp_path, workers):
    res = train(TrainConfig(data=(synthetic_dataset,), out=str(tmp_path / "cam"), model="small_cnn", batch_size=32,
                            max_steps=2, workers=workers, progress=False, threads=1,
                            augment=AugmentConfig(camera=0.5)))
    assert res.steps == 2 and all(np.isfinite(res.losses))
