"""The FCOS detector on a classifier's stages, and its trainer: init, losses, checkpoints, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from signscale.data.scene_shards import ScenePackConfig, pack_scenes
from signscale.detection.detector import (
    DetectorError,
    build_detector,
    detector_config,
    detector_labels,
    make_config,
)
from signscale.detection.train import DetTrainConfig, crop_tile, load_detector, save_detector, train_detector
from signscale.labels import LabelSpace
from signscale.models import create_model, model_config
from signscale.training import checkpoint
from signscale.transforms import Preprocess

SCENES = "scenes-synthetic:?n=16&seed=5&width=128&height=96&min_px=8&max_px=28&max_signs=3&empty=0"


def _tiny_classifier():
    torch.manual_seed(0)
    return create_model("small_cnn", 43, widths=[8, 16, 32])


def _config(clf):
    return make_config(model_config(clf), preprocess=Preprocess().to_dict(), fpn_channels=32)


def test_backbone_starts_from_the_classifier_and_has_a_stride_4_level():
    clf = _tiny_classifier()
    det = build_detector(_config(clf), clf)
    assert det.backbone.strides == [4, 8, 16]
    for a, b in zip(det.backbone.stages.state_dict().values(), clf.stages.state_dict().values()):
        assert torch.equal(a, b)
    det.eval()
    with torch.no_grad():
        feats = det.backbone(torch.zeros(1, 3, 96, 128))
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(24, 32), (12, 16), (6, 8)]


def test_losses_and_predictions():
    clf = _tiny_classifier()
    det = build_detector(_config(clf), clf)
    det.train()
    imgs = [torch.rand(3, 96, 128), torch.rand(3, 96, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 10, 22, 22], [50, 40, 90, 80]]), "labels": torch.tensor([1, 1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = det(imgs, targets)
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    sum(losses.values()).backward()
    det.eval()
    with torch.no_grad():
        out = det(imgs)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4
    assert (out[0]["boxes"][:, 2] <= 128).all() and (out[0]["boxes"][:, 3] <= 96).all()  # native resolution kept


def test_config_is_plain_data_and_rebuilds_the_same_network(tmp_path):
    clf = _tiny_classifier()
    det = build_detector(_config(clf), clf)
    cfg = detector_config(det)
    assert json.loads(json.dumps(cfg)) == cfg
    url = save_detector(str(tmp_path / "model"), det, LabelSpace.for_country("de"))
    again, meta = load_detector(url)
    assert meta["kind"] == "signscale.detector"
    for (k, a), b in zip(det.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(DetectorError, match="classes"):
        make_config(model_config(clf), preprocess=Preprocess().to_dict(), classes="everything")


def test_category_labels():
    space = LabelSpace.for_country("de")
    fine = torch.tensor([2, 14, 38, 11])  # speed limit, stop, keep right, right of way
    assert detector_labels(fine, "sign", space).tolist() == [1, 1, 1, 1]
    assert detector_labels(fine, "category", space).tolist() == [1, 4, 3, 2]


def test_tile_keeps_signs_and_moves_boxes():
    img = torch.zeros(96, 128, 3, dtype=torch.uint8)
    boxes = torch.tensor([[100.0, 60, 120, 80]])
    tile, b, lab = crop_tile(img, boxes, torch.tensor([5]), (64, 48), np.random.default_rng(1), flip=False)
    assert tile.shape == (48, 64, 3)
    if len(b):
        assert (b[:, 2] <= 64).all() and (b[:, 3] <= 48).all() and lab.tolist() == [5]


def test_scaled_tile_zooms_the_scene_and_its_boxes():
    img = torch.zeros(200, 300, 3, dtype=torch.uint8)
    img[100:110, 150:160] = 255  # a 10 px "sign"
    boxes = torch.tensor([[150.0, 100, 160, 110]])
    for lo, hi in ((0.5, 0.5), (2.0, 2.0)):
        tile, b, lab = crop_tile(img, boxes, torch.tensor([3]), (64, 48), np.random.default_rng(0), flip=False,
                                 sign_p=1.0, scale=(lo, hi))
        assert tile.shape == (48, 64, 3) and lab.tolist() == [3]
        side = float(b[0, 2] - b[0, 0])
        assert side == pytest.approx(10 * lo, abs=0.6)  # the sign is drawn at the new size ...
        x1, y1, x2, y2 = (round(float(v)) for v in b[0])
        inside = tile[y1 + 1:y2 - 1, x1 + 1:x2 - 1].float().mean() if lo > 1 else tile[y1:y2, x1:x2].float().mean()
        assert inside > 150  # ... where its box says


def test_tiles_centre_on_hard_negatives_when_asked():
    img = torch.zeros(400, 600, 3, dtype=torch.uint8)
    img[20:40, 500:520] = 255  # where the detector fired wrongly
    neg = np.array([[500.0, 20, 520, 40]])
    none = torch.zeros(0, 4)
    labels = torch.zeros(0, dtype=torch.int64)

    def shows_it(negative_p: float, seed: int) -> bool:
        tile, _, _ = crop_tile(img, none, labels, (64, 48), np.random.default_rng(seed), flip=False, sign_p=0.0,
                               negatives=neg, negative_p=negative_p)
        return bool((tile == 255).any())

    assert all(shows_it(1.0, seed) for seed in range(30))
    assert sum(shows_it(0.0, seed) for seed in range(30)) < 10  # random tiles rarely do


def test_camera_augment_is_deterministic_and_changes_pixels():
    from signscale.detection.train import camera_augment

    img = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    a = camera_augment(img, np.random.default_rng(3), photometric=1.0, blur_p=1.0, jpeg_p=1.0)
    b = camera_augment(img, np.random.default_rng(3), photometric=1.0, blur_p=1.0, jpeg_p=1.0)
    assert a.shape == img.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    assert (a.float() - img.float()).abs().mean() > 5
    assert torch.equal(camera_augment(img, np.random.default_rng(3), photometric=0, blur_p=0, jpeg_p=0), img)


@pytest.fixture(scope="module")
def scene_data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("scenes") / "train")
    pack_scenes(ScenePackConfig(source=SCENES, out=out, shard_mb=0.05))
    return out


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    clf = _tiny_classifier()
    url = str(tmp_path_factory.mktemp("clf") / "model")
    checkpoint.save_model(url, state_dict=clf.state_dict(), model_config=model_config(clf),
                          label_space=LabelSpace.for_country("de").to_dict(), preprocess=Preprocess().to_dict())
    return url


def _cfg(data, out, backbone, **kw):
    base = {"data": (data,), "out": out, "backbone": backbone, "tile": (64, 48), "batch_size": 4,
            "fpn_channels": 32, "workers": 0, "warmup_steps": 2, "log_every": 1, "threads": 1}
    return DetTrainConfig(**{**base, **kw})


def test_train_writes_checkpoint_and_model(scene_data, backbone, tmp_path):
    res = train_detector(_cfg(scene_data, str(tmp_path / "run"), backbone, max_steps=3))
    assert res.steps == 3 and all(np.isfinite(res.losses))
    assert checkpoint.latest_checkpoint(str(tmp_path / "run")).endswith("step-000000003.pt")
    _, meta = load_detector(res.model_url)
    assert meta["train_config"]["backbone"] == backbone


def test_resume_is_exact(scene_data, backbone, tmp_path):
    """3 + 3 steps with a resume in between give the losses of 6 uninterrupted steps (CPU, fp32)."""
    full = train_detector(_cfg(scene_data, str(tmp_path / "full"), backbone, max_steps=6))
    half = str(tmp_path / "half")
    train_detector(_cfg(scene_data, half, backbone, max_steps=6, max_minutes=1e-9))  # stops after step 1
    first = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(half))
    assert int(first["step"]) == 1
    resumed = train_detector(_cfg(scene_data, half, backbone, max_steps=6, resume="auto"))
    assert resumed.steps == 6
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5, abs=1e-6)


def test_fine_tune_from_a_detector_with_real_road_augmentation(scene_data, backbone, tmp_path):
    first = train_detector(_cfg(scene_data, str(tmp_path / "a"), backbone, max_steps=2))
    key = load_scene_keys(scene_data)[0]
    fa = tmp_path / "false_alarms.json"
    fa.write_text(json.dumps({key: [[5, 5, 25, 25, 0.9]]}))
    res = train_detector(_cfg(scene_data, str(tmp_path / "b"), "", init_from=first.model_url, max_steps=2,
                              scale=(0.6, 1.6), photometric=0.5, blur_p=0.5, jpeg_p=0.5, negatives=str(fa),
                              negative_tiles=0.2, data_weights=(2.0,)))
    assert res.steps == 2 and all(np.isfinite(res.losses))
    start, _ = load_detector(first.model_url)
    tuned, meta = load_detector(res.model_url)
    assert meta["train_config"]["init_from"] == first.model_url
    a, b = start.state_dict(), tuned.state_dict()
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())  # it trained from there


def load_scene_keys(url):
    from signscale.data.scene_shards import iter_scenes

    return [extra["key"] for _, extra in iter_scenes(url)]


def test_bad_config_names_the_field():
    from signscale.config import ConfigError

    with pytest.raises(ConfigError, match="tile"):
        DetTrainConfig(data=("x",), tile=(0, 5))
    with pytest.raises(ConfigError, match="data"):
        DetTrainConfig()
    with pytest.raises(ConfigError, match="negative_tiles: give negatives"):
        DetTrainConfig(data=("x",), negative_tiles=0.2)
    with pytest.raises(ConfigError, match="scale"):
        DetTrainConfig(data=("x",), scale=(2.0, 1.0))


@pytest.mark.slow
def test_two_process_ddp_training(scene_data, backbone, tmp_path):
    """torchrun with 2 real processes (gloo): both ranks step together, rank 0 writes the model."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "signscale",
           "train-detector", f"--data={scene_data}", f"--backbone={backbone}", f"--out={out}", "--max_steps=2",
           "--tile=64,48", "--batch_size=2", "--fpn_channels=32", "--workers=0", "--threads=1", "--warmup_steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "2 process(es)" in proc.stdout
    st = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(str(out)))
    assert st["world_size"] == 2 and int(st["step"]) == 2
    assert (out / "model" / "model.json").exists()


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_mixed_precision_steps(scene_data, backbone, tmp_path, name):
    res = train_detector(_cfg(scene_data, str(tmp_path / name), backbone, max_steps=2, precision=name))
    assert res.steps == 2 and all(np.isfinite(res.losses))
