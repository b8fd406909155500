"""Scene evaluation on hand-made frames: size buckets, the second stage's rejections, weather by seed,
hard negatives for mining, the report's crops; and ``show`` drawing a scene source's boxes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from signscale.detection.detect import DetectPipeline
from signscale.detection.evaluate import SceneEvalConfig, SceneEvalError, corrupt_frame, evaluate_scenes
from signscale.detection.matching import size_bucket
from signscale.labels import LabelSpace

# modules these tests exercise through the ones they import (tests/test_layout.py)
COVERS = ("signscale.detection.scene_report",)

SPACE = LabelSpace.for_country("de")
STOP = 14


def write_gtsdb(root: Path, frames: list[list[list[int]]], *, size: tuple[int, int] = (96, 160), bright: bool = False,
                suffix: str = "png") -> str:
    """A GTSDB folder: frame i holds boxes ``frames[i]`` (x2/y2 exclusive, all class stop); with ``bright``,
    dark frames (40) with each sign a bright square (230), so a detector that reads pixels finds them."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, boxes in enumerate(frames):
        arr = np.full((*size, 3), 40 if bright else 0, np.uint8)
        for x1, y1, x2, y2 in boxes:
            if bright:
                arr[y1:y2, x1:x2] = 230
            lines.append(f"{i:05d}.{suffix};{x1};{y1};{x2 - 1};{y2 - 1};{STOP}")  # GTSDB corners are inclusive
        Image.fromarray(arr).save(root / f"{i:05d}.{suffix}")
    (root / "gt.txt").write_text("\n".join(lines) + "\n")
    return f"gtsdb:{root}"


class FixedBoxes:
    """A first stage that finds the same boxes in every frame (the BoxDetector protocol of detect.py)."""

    class_names = ("sign",)

    def __init__(self, boxes: list[list[float]], scores: list[float]) -> None:
        self.b, self.s = np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32)

    def boxes(self, images):
        return [(self.b.copy(), self.s.copy(), np.ones(len(self.b), np.int64)) for _ in images]


class ProbeDetector:
    """Scores fixed candidate boxes by their mean brightness: a detector whose answers follow the pixels,
    so weather that darkens or washes out a frame changes what it finds."""

    class_names = ("sign",)

    def __init__(self, candidates: list[list[int]]) -> None:
        self.c = np.asarray(candidates, np.float32)

    def boxes(self, images):
        out = []
        for im in images:
            s = np.asarray([im[int(y1):int(y2), int(x1):int(x2)].mean() / 255 for x1, y1, x2, y2 in self.c], np.float32)
            out.append((self.c.copy(), s, np.ones(len(self.c), np.int64)))
        return out


class NamesStop:
    """A second stage that calls every crop a stop sign."""

    label_space = SPACE

    def classify(self, crops):
        return np.full(len(crops), STOP, np.int64), np.full(len(crops), 0.95, np.float32)


def test_size_bucket_edges():
    assert [size_bucket([0, 0, s, 4]) for s in (15.9, 16, 31.9, 32, 63.9, 64, 300)] == \
        ["<16", "16-32", "16-32", "32-64", "32-64", ">64", ">64"]
    assert size_bucket([0, 0, 4, 20]) == "16-32"  # the longer side decides


def test_recall_by_size_on_hand_made_boxes(tmp_path):
    a, b, c, d, e = [4, 4, 14, 12], [30, 4, 50, 20], [60, 4, 100, 30], [120, 10, 200, 90], [4, 40, 20, 50]
    spec = write_gtsdb(tmp_path / "g", [[a, b, c, d, e]], size=(120, 240))
    pipe = DetectPipeline(FixedBoxes([a, c], [0.9, 0.9]), NamesStop(), margin=0.0)
    m = evaluate_scenes(SceneEvalConfig(detector="-", data=spec), pipeline=pipe).metrics
    by = {k: (v["recall"], v["count"]) for k, v in m["recall_by_size"].items()}
    assert by == {"<16": (1.0, 1), "16-32": (0.0, 2), "32-64": (1.0, 1), ">64": (0.0, 1)}
    assert m["recall_small"]["count"] == 3 and m["recall_small"]["recall"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(2 / 5) and m["fp_per_image"] == 0
    assert m["end_to_end_accuracy"] == pytest.approx(2 / 5)  # found and named stop


class FlaggingPipeline:
    """A pipeline whose second stage rejects some boxes as "not a sign", returned flagged only when asked
    (the contract of DetectPipeline.detect with keep_rejected)."""

    detector = FixedBoxes([], [])
    classifier = NamesStop()

    def __init__(self, dets: list[dict]) -> None:
        self.dets = dets
        self.asked: list[bool] = []

    def detect(self, images, keep_rejected: bool = False):
        self.asked.append(keep_rejected)
        return [[dict(d) for d in self.dets if keep_rejected or not d.get("rejected", False)] for _ in images]


def _det(box, score, *, rejected=False):
    d = {"box": box, "score": score, "detector_class": "sign", "class_id": STOP, "key": "stop", "confidence": 0.9}
    return {**d, "rejected": True, "key": "not_a_sign"} if rejected else d


def test_a_rejected_detection_is_removed_and_counted(tmp_path):
    s1, s2 = [10, 10, 30, 30], [50, 10, 70, 30]
    spec = write_gtsdb(tmp_path / "g", [[s1, s2]])
    pipe = FlaggingPipeline([_det(s1, 0.9), _det(s2, 0.8, rejected=True),  # a true sign rejected: now a miss
                             _det([100, 50, 120, 70], 0.7),  # a false alarm kept
                             _det([130, 50, 150, 70], 0.6, rejected=True)])  # a false alarm rejected: gone
    m = evaluate_scenes(SceneEvalConfig(detector="-", data=spec), pipeline=pipe).metrics
    assert pipe.asked and all(pipe.asked)
    assert m["recall"] == 0.5 and m["fp_per_image"] == 1.0 and m["end_to_end_accuracy"] == 0.5
    assert m["rejection"] == {"rejected": 2, "false_alarms_removed": 1, "signs_removed": 1,
                              "fp_per_image_without_rejection": 2.0}
    assert m["map_50"] < 1.0  # the rejected sign's box is not in the mAP either


def test_false_alarms_json_lists_hard_negatives_and_the_report_shows_crops(tmp_path):
    a = [10, 10, 30, 30]
    spec = write_gtsdb(tmp_path / "g", [[a], []])
    boxes = [a, [20, 10, 40, 30], [22, 10, 42, 30], [100, 50, 120, 70], [130, 50, 150, 70]]
    scores = [0.9, 0.6, 0.5, 0.25, 0.1]  # IoU with the sign: 1, 0.33, 0.25, 0, 0
    pipe = DetectPipeline(FixedBoxes(boxes, scores), NamesStop(), margin=0.0)
    out = tmp_path / "report"
    rep = evaluate_scenes(SceneEvalConfig(detector="-", data=spec, out=str(out)), pipeline=pipe)
    mined = json.loads((out / "false_alarms.json").read_text())
    # frame 0: the box on the sign and the one at IoU 0.33 are not negatives; 0.1 is under the mining threshold
    assert mined == {"00000.png": [[22.0, 10.0, 42.0, 30.0, 0.5], [100.0, 50.0, 120.0, 70.0, 0.25]],
                     "00001.png": [[10.0, 10.0, 30.0, 30.0, 0.9], [20.0, 10.0, 40.0, 30.0, 0.6],
                                   [22.0, 10.0, 42.0, 30.0, 0.5], [100.0, 50.0, 120.0, 70.0, 0.25]]}
    assert rep.metrics["hard_negatives"] == 6 and rep.files["false_alarms"].endswith("false_alarms.json")
    html = (out / "report.html").read_text()
    crops = html.split("False alarms, highest score first")[1].split("Full frames")[0]
    assert crops.count("<figure>") == 5  # score >= 0.3 and unmatched at IoU 0.5: 2 in frame 0, 3 in frame 1
    assert "00001.png: score 0.90, named stop (0.95)" in crops
    assert html.index("False alarms, highest score first") < html.index("Full frames")
    pipe2 = FlaggingPipeline([_det(a, 0.9, rejected=True)])  # rejected by the second stage: still a detector negative
    evaluate_scenes(SceneEvalConfig(detector="-", data=spec, out=str(out)), pipeline=pipe2)
    assert json.loads((out / "false_alarms.json").read_text())["00001.png"] == [[10.0, 10.0, 30.0, 30.0, 0.9]]


def test_weather_table_is_deterministic_by_seed(tmp_path):
    signs = [[[10, 10, 34, 34], [60, 20, 80, 40]], [[100, 30, 124, 54]], [[20, 50, 44, 74], [120, 10, 140, 30]]]
    spec = write_gtsdb(tmp_path / "g", signs, bright=True)
    pipe = DetectPipeline(ProbeDetector([b for f in signs for b in f] + [[130, 60, 150, 80]]), NamesStop(), margin=0.0)

    def run(**kw):  # at 0.6 a sign (0.9 clean) is found and lost at night (0.48); the dark road (0.16) never
        cfg = SceneEvalConfig(detector="-", data=spec, corruptions="night,fog,snow,blur", score_thresh=0.6, **kw)
        return evaluate_scenes(cfg, pipeline=pipe).metrics

    first = run(seed=3, batch=3, out=str(tmp_path / "r"))
    table = first["conditions"]
    assert list(table) == ["clean", "night", "fog", "snow", "blur"] and first["severity"] == 3
    assert table == run(seed=3, batch=1)["conditions"]  # the same frames, whatever the batching
    assert table["clean"]["recall"] == 1.0 and table["night"]["recall"] == 0.0
    assert table["night"]["map_50"] == table["clean"]["map_50"]  # darker, not reordered: only the threshold bites
    frame = np.asarray(Image.open(tmp_path / "g" / "00000.png"))
    snow = lambda seed, index=0: corrupt_frame(frame, np.asarray(signs[0]), "snow", 3, seed=seed, index=index)
    assert np.array_equal(snow(3), snow(3)) and not np.array_equal(snow(3), snow(4))
    assert not np.array_equal(snow(3), snow(3, index=1))  # each frame its own flakes
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["conditions"]["night"]["recall"] == table["night"]["recall"]
    html = (tmp_path / "r" / "report.html").read_text()
    assert "night (severity 3)" in html and "fog (severity 3)" in html
    with pytest.raises(SceneEvalError, match="hail"):
        SceneEvalConfig(detector="-", data=spec, corruptions="hail")


def test_camera_faults_score_scenes_too_and_keep_the_weather_seeds():
    from signscale.corruptions import CAMERA_FAULTS, CORRUPTIONS

    cfg = SceneEvalConfig(detector="-", data="-", corruptions="all")
    assert cfg.corruptions == CORRUPTIONS + CAMERA_FAULTS  # faults after the weather kinds
    frame = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    boxes = np.asarray([[10, 10, 30, 30]])
    for kind in CAMERA_FAULTS:
        a = corrupt_frame(frame, boxes, kind, 3, seed=1, index=2)
        assert a.shape == frame.shape and a.dtype == np.uint8 and not np.array_equal(a, frame)
        assert np.array_equal(a, corrupt_frame(frame, boxes, kind, 3, seed=1, index=2))


def test_show_draws_the_boxes_on_the_contact_sheet(tmp_path):
    from signscale.data.show import BOX_COLOUR, show

    box = [40, 30, 80, 60]
    spec = write_gtsdb(tmp_path / "g", [[box, [100, 20, 120, 40]], []], suffix="jpg")
    s = show(spec, out=str(tmp_path / "sheet.png"), scene_width=160)
    assert (s.samples, s.boxes, s.per_class[STOP], s.frame_sizes) == (2, 2, 2, {"160x96": 2})
    assert "2 scenes" in s.summary() and "2 boxes" in s.summary()
    sheet = np.asarray(Image.open(tmp_path / "sheet.png").convert("RGB")).astype(int)
    near = (np.abs(sheet - np.asarray(BOX_COLOUR)).sum(axis=2) < 60)
    assert near.any()
    # the first frame's tile sits at (4, 26) (pad, title); the outline runs just outside the 40x30 box
    x0, y0 = 4, 26
    assert near[y0 + 45, x0 + box[0] - 1] and near[y0 + 45, x0 + box[2]]  # left and right edges
    assert near[y0 + box[1] - 1, x0 + 60] and near[y0 + box[3], x0 + 60]  # top and bottom edges
    assert not near[y0 + 45, x0 + 60]  # an outline, not a filled box


@pytest.mark.slow
@pytest.mark.skipif(not Path("/work/shared/data/GTSDB_real_train_816x480.zip").exists(), reason="real GTSDB copy")
def test_show_reads_the_real_gtsdb_copy(tmp_path):
    from signscale.data.show import show

    s = show("gtsdb:/work/shared/data/GTSDB_real_train_816x480.zip", out=str(tmp_path / "sheet.png"))
    assert (s.samples, s.boxes, s.problems, s.frame_sizes) == (466, 801, 0, {"816x480": 466})


def test_threshold_sweep_scores_each_operating_point(tmp_path):
    a, b = [10, 10, 30, 30], [50, 10, 70, 30]
    spec = write_gtsdb(tmp_path / "g", [[a, b]])
    pipe = FlaggingPipeline([_det(a, 0.95), _det(b, 0.55), _det([100, 50, 120, 70], 0.45),
                             _det([130, 50, 150, 70], 0.35)])
    m = evaluate_scenes(SceneEvalConfig(detector="-", data=spec), pipeline=pipe).metrics
    sweep = {r["score_thresh"]: r for r in m["threshold_sweep"]}
    assert [sweep[t]["recall"] for t in (0.3, 0.5, 0.6, 0.9)] == [1.0, 1.0, 0.5, 0.5]
    assert [sweep[t]["fp_per_image"] for t in (0.3, 0.4, 0.5)] == [2.0, 1.0, 0.0]
    assert sweep[0.3]["recall"] == m["recall"] and sweep[0.3]["fp_per_image"] == m["fp_per_image"]
