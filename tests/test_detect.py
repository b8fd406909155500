"""The two-stage pipeline, scene evaluation and the detect command, with real models on tiny data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from signscale.data.scene_shards import ScenePackConfig, pack_scenes
from signscale.data.sources.scenes import open_scene_source
from signscale.detection.detect import (
    CropClassifier,
    DetectPipeline,
    detect_files,
    draw_detections,
    load_pipeline,
)
from signscale.detection.detector import build_detector, make_config
from signscale.detection.evaluate import SceneEvalConfig, evaluate_scenes
from signscale.detection.matching import match_boxes
from signscale.detection.train import save_detector
from signscale.labels import LabelSpace
from signscale.models import create_model, model_config
from signscale.transforms import Preprocess

CLASSES = (1, 14, 38)  # speed limit 30, stop, keep right: a classifier learns these in seconds
CROPS = f"synthetic:?n=900&size=32&seed=7%26classes={','.join(map(str, CLASSES))}"
SCENES = ("scenes-synthetic:?n=6&seed=11&width=192&height=128&min_px=20&max_px=40&max_signs=3&empty=0"
          "&occlusion=0&weather=0&signs=synthetic:?n=900%26size=32%26seed=99%26classes=1,14,38")


class GroundTruthDetector:
    """A first stage that returns the true boxes: isolates the second stage (the stages are replaceable)."""

    class_names = ("sign",)

    def __init__(self, boxes: list[list[list[int]]]) -> None:
        self.truth = boxes

    def boxes(self, images):
        return [(np.asarray(b, np.float32).reshape(-1, 4), np.ones(len(b), np.float32), np.ones(len(b), np.int64))
                for b in self.truth[:len(images)]]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> str:
    """A real small classifier trained on crops of three classes (packed and trained by signscale)."""
    from signscale.data.pack import PackConfig, pack
    from signscale.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("clf")
    data = str(root / "crops")
    pack(PackConfig(source=CROPS.replace("%26", "&"), out=data, image_size=32, shard_mb=1, workers=0, progress=False))
    res = train(TrainConfig(data=(data,), out=str(root / "run"), model="small_cnn", epochs=6, batch_size=64, lr=5e-3,
                            workers=0, progress=False, ema=0.0))
    return res.model_url


@pytest.fixture(scope="module")
def untrained_detector(tmp_path_factory) -> str:
    torch.manual_seed(0)
    clf = create_model("small_cnn", 43, widths=[8, 16, 32])
    det = build_detector(make_config(model_config(clf), preprocess=Preprocess().to_dict(), fpn_channels=32), clf)
    return save_detector(str(tmp_path_factory.mktemp("det") / "model"), det, LabelSpace.for_country("de"))


def _scenes():
    src = open_scene_source(SCENES)
    return [src.read(i) for i in range(len(src))]


def test_match_boxes_is_greedy_by_score():
    truth = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    pred = np.array([[0, 0, 10, 11], [1, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    assert match_boxes(pred, np.array([0.9, 0.95, 0.99]), truth).tolist() == [1, -1]


def test_pipeline_names_the_right_fine_class(classifier):
    scenes = _scenes()
    truth = [s.meta["boxes"] for s in scenes]
    pipe = DetectPipeline(GroundTruthDetector(truth), CropClassifier.load(classifier), margin=0.0)
    results = pipe.detect([s.image for s in scenes])
    space = LabelSpace.for_country("de")
    right = total = 0
    for s, dets in zip(scenes, results):
        assert [d["box"] for d in dets] == [[float(v) for v in b] for b in s.meta["boxes"]]
        for d, lab in zip(dets, s.meta["labels"]):
            assert d["country"] == "de" and 0 <= d["confidence"] <= 1
            right += d["key"] == space[lab].key
            total += 1
    assert total >= 6 and right / total >= 0.9


def test_fcos_pipeline_api_and_detect_files(classifier, untrained_detector, tmp_path):
    pipe = load_pipeline(untrained_detector, classifier, score_thresh=0.0)
    scenes = _scenes()[:2]
    out = pipe.detect([s.image for s in scenes])
    assert len(out) == 2
    for dets in out:
        for d in dets:
            assert set(d) >= {"box", "score", "key", "name", "country", "confidence", "class_id"}
        json.dumps(dets)
    assert pipe.detect([]) == []
    with pytest.raises(ValueError, match="uint8"):
        pipe.detect([np.zeros((10, 10, 3), np.float32)])
    from PIL import Image

    path = tmp_path / "road.png"
    Image.fromarray(scenes[0].image).save(path)
    rows = detect_files(pipe, [str(path)], str(tmp_path / "out"))
    doc = json.loads((tmp_path / "out" / "road.json").read_text())
    assert doc["width"] == 192 and len(doc["detections"]) == rows[0]["signs"]
    assert (tmp_path / "out" / "road.det.png").exists()


def test_evaluate_scenes_with_a_perfect_first_stage(classifier, tmp_path):
    scenes = _scenes()
    pipe = DetectPipeline(GroundTruthDetector([s.meta["boxes"] for s in scenes]), CropClassifier.load(classifier),
                          margin=0.0)
    rep = evaluate_scenes(SceneEvalConfig(detector="-", data=SCENES, classifier=classifier, batch=len(scenes)),
                          pipeline=pipe)
    m = rep.metrics
    assert m["map_50"] == pytest.approx(1.0) and m["recall"] == 1.0 and m["fp_per_image"] == 0
    assert m["end_to_end_accuracy"] >= 0.9
    assert sum(v["count"] for v in m["recall_by_size"].values()) == m["signs"]


def test_evaluate_scenes_report_with_overlays(untrained_detector, classifier, tmp_path):
    data = str(tmp_path / "packed")
    pack_scenes(ScenePackConfig(source=SCENES, out=data))
    out = tmp_path / "report"
    rep = evaluate_scenes(SceneEvalConfig(detector=untrained_detector, data=data, classifier=classifier, out=str(out),
                                          score_thresh=0.05, worst=2))
    m = rep.metrics
    assert m["scenes"] == 6 and 0 <= m["map_50"] <= 1 and m["scenes_per_s"] > 0
    html = (out / "report.html").read_text()
    assert "mAP@0.5" in html and "<img" in html  # an untrained detector misses signs: overlays exist
    assert list((out / "overlays").glob("*.png"))
    assert json.loads((out / "metrics.json").read_text())["signs"] == m["signs"]


def test_detect_command(untrained_detector, classifier, tmp_path):
    from PIL import Image

    from signscale.cli import main

    path = tmp_path / "scene.png"
    Image.fromarray(_scenes()[0].image).save(path)
    rc = main(["detect", untrained_detector, str(path), "--out", str(tmp_path / "o"), "--classifier", classifier])
    assert rc == 0 and (tmp_path / "o" / "scene.json").exists()


def test_evaluate_scenes_command_with_weather_and_hard_negatives(untrained_detector, tmp_path):
    from signscale.cli import main

    out = tmp_path / "rep"
    rc = main(["evaluate-scenes", untrained_detector, SCENES, "--no-classifier", "--corruptions", "night,fog",
               "--severity", "2", "--limit", "3", "--out", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    assert rc == 0 and list(m["conditions"]) == ["clean", "night", "fog"] and m["severity"] == 2
    assert m["frames_per_s"] > 0 and "operating threshold" in m["frames_per_s_basis"]  # a real FCOS detector
    mined = json.loads((out / "false_alarms.json").read_text())
    assert len(mined) == 3 and all(len(b) == 5 and b[4] >= 0.2 for v in mined.values() for b in v)


def test_draw_marks_missed_signs():
    img = np.zeros((40, 40, 3), np.uint8)
    pic = draw_detections(img, [{"box": [2, 2, 20, 20], "score": 0.9, "key": "stop", "confidence": 0.8}],
                          truth=[[5, 5, 30, 30]], miss=[0])
    assert pic.shape == (40, 40, 3) and tuple(pic[4, 28]) == (255, 0, 255)


@pytest.fixture(scope="module")
def classifier_with_background(tmp_path_factory) -> str:
    """The three-class crops plus "not a sign" crops cut from packed training scenes away from the signs."""
    from signscale.data.pack import PackConfig, pack
    from signscale.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("clf-bg")
    crops, scenes, bg = str(root / "crops"), str(root / "scenes"), str(root / "bg")
    pack(PackConfig(source=CROPS.replace("%26", "&"), out=crops, image_size=32, shard_mb=1, workers=0, progress=False))
    pack_scenes(ScenePackConfig(source=SCENES.replace("n=6&seed=11", "n=40&seed=5"), out=scenes, image_format="png"))
    pack(PackConfig(source=f"scene-crops:{scenes}?background=6&min_px=8", out=bg, image_size=32, workers=0,
                    progress=False))
    res = train(TrainConfig(data=(crops, bg), out=str(root / "run"), model="small_cnn", epochs=6, batch_size=64,
                            lr=5e-3, workers=0, progress=False, ema=0.0))
    return res.model_url


def test_second_stage_background_class_rejects_a_false_box(classifier_with_background):
    from signscale.data.sources.scene_crops import background_boxes

    clf = CropClassifier.load(classifier_with_background)
    assert clf.label_space[clf.label_space.background_id].key == "not_a_sign"
    scenes = _scenes()  # other scenes than the ones its background came from
    rng = np.random.default_rng(0)
    truth = [s.meta["boxes"] for s in scenes]
    false = [background_boxes(np.asarray(t, np.float64).reshape(-1, 4), (s.meta["width"], s.meta["height"]), 3, rng)
             for s, t in zip(scenes, truth)]
    boxes = [list(t) + f for t, f in zip(truth, false)]
    imgs = [s.image for s in scenes]
    kept = DetectPipeline(GroundTruthDetector(boxes), clf, margin=0.0).detect(imgs)
    flagged = DetectPipeline(GroundTruthDetector(boxes), clf, margin=0.0).detect(imgs, keep_rejected=True)
    n_true, n_false = sum(map(len, truth)), sum(map(len, false))
    true_boxes = {(i, tuple(float(v) for v in b)) for i, t in enumerate(truth) for b in t}
    kept_true = sum((i, tuple(d["box"])) in true_boxes for i, ds in enumerate(kept) for d in ds)
    kept_false = sum(len(ds) for ds in kept) - kept_true
    assert n_false >= 10 and kept_false <= 0.2 * n_false  # false boxes rejected ...
    assert kept_true >= 0.8 * n_true  # ... and the signs kept
    assert all("rejected" not in d and d["key"] != "not_a_sign" for ds in kept for d in ds)
    rejected = [d for ds in flagged for d in ds if d.get("rejected")]
    assert len(rejected) == sum(map(len, boxes)) - sum(map(len, kept))
    assert all(d["key"] == "not_a_sign" for d in rejected)


def test_folding_batchnorm_keeps_the_detector_outputs(untrained_detector):
    import copy

    from signscale.detection.detect import fold_batchnorm
    from signscale.detection.train import load_detector

    model, _ = load_detector(untrained_detector)
    for m in model.modules():  # non-trivial statistics, so a wrong fold would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    folded = fold_batchnorm(copy.deepcopy(model))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        a = model.backbone(model.transform(x)[0].tensors)
        b = folded.backbone(folded.transform(x)[0].tensors)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-4), k
