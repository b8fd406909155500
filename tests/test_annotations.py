"""yolo: and coco: readers on tiny generated exports, including every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from signscale.data.scene_shards import ScenePackConfig, pack_scenes
from signscale.data.sources import SourceError
from signscale.data.sources.annotations import resolve_names
from signscale.data.sources.scenes import open_scene_source
from signscale.labels import LabelSpace


def _img(path: Path, w: int = 100, h: int = 80) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)


@pytest.fixture
def yolo_dir(tmp_path) -> Path:
    root = tmp_path / "yolo"
    _img(root / "images" / "a.png")
    _img(root / "images" / "b.png")  # no label file
    (root / "labels").mkdir(parents=True)
    # a box at (10..30, 20..40), one at (50..70, 0..20), an unknown class, out of image, malformed
    (root / "labels" / "a.txt").write_text("0 0.2 0.375 0.2 0.25\n1 0.6 0.125 0.2 0.25\n2 0.5 0.5 0.1 0.1\n"
                                           "0 1.5 1.5 0.1 0.1\nnonsense line\n")
    (root / "labels" / "c.txt").write_text("0 0.5 0.5 0.1 0.1\n")  # no image
    (root / "classes.txt").write_text("speed_limit_50\nStop\nunicorn crossing\n")
    return root


def test_names_resolve_by_key_name_or_id():
    space = LabelSpace.for_country("de")
    assert resolve_names(["speed_limit_50", "Speed limit (50km/h)", "14", "STOP", "nope"], space) == [2, 2, 14, 14,
                                                                                                       None]


def test_yolo_boxes_in_pixels(yolo_dir):
    src = open_scene_source(f"yolo:{yolo_dir}")
    assert len(src) == 2
    a = src.read(0)
    assert a.key == "images/a.png"
    assert a.meta["boxes"] == [[10, 20, 30, 40], [50, 0, 70, 20]]
    assert a.meta["labels"] == [2, 14]
    problems = " | ".join(a.meta["problems"])
    assert "labels/a.txt:3: class_not_in_catalogue" in problems
    assert "labels/a.txt:4: box_outside_image" in problems
    assert "labels/a.txt:5: bad_line" in problems
    b = src.read(1)
    assert b.meta["boxes"] == [] and "missing_label_file" in b.meta["problems"][0]
    assert [(p.key, p.reason) for p in src.problems] == [("labels/c.txt", "label_without_image")]


def test_yolo_data_yaml_and_split(tmp_path):
    root = tmp_path / "y2"
    _img(root / "images" / "train" / "x.png")
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "x.txt").write_text("1 0.5 0.5 0.2 0.25\n")
    (root / "data.yaml").write_text("names: {0: stop, 1: keep_right}\n")
    s = open_scene_source(f"yolo:{root}?split=train").read(0)
    assert s.meta["labels"] == [38] and s.meta["boxes"] == [[40, 30, 60, 50]]


def test_yolo_without_names_is_a_clear_error(tmp_path):
    _img(tmp_path / "y" / "images" / "a.png")
    with pytest.raises(SourceError, match="classes.txt"):
        open_scene_source(f"yolo:{tmp_path / 'y'}")


@pytest.fixture
def coco_file(tmp_path) -> Path:
    _img(tmp_path / "images" / "one.png")
    _img(tmp_path / "images" / "two.png")
    doc = {"images": [{"id": 1, "file_name": "one.png", "width": 100, "height": 80},
                      {"id": 2, "file_name": "two.png", "width": 100, "height": 80},
                      {"id": 3, "file_name": "gone.png", "width": 100, "height": 80}],
           "annotations": [{"id": 1, "image_id": 1, "bbox": [10, 20, 20, 20], "category_id": 7},
                           {"id": 2, "image_id": 1, "bbox": [60, 10, 0, 10], "category_id": 7},
                           {"id": 3, "image_id": 1, "bbox": [5, 5, 10, 10], "category_id": 9},
                           {"id": 4, "image_id": 42, "bbox": [5, 5, 10, 10], "category_id": 7},
                           {"id": 5, "image_id": 2, "bbox": [90, 70, 30, 30], "category_id": 8}],
           "categories": [{"id": 7, "name": "keep_right"}, {"id": 8, "name": "Yield"}, {"id": 9, "name": "tram"}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc))
    return path


def test_coco_reader(coco_file):
    src = open_scene_source(f"coco:{coco_file}")
    assert len(src) == 2
    one, two = src.read(0), src.read(1)
    assert one.meta["boxes"] == [[10, 20, 30, 40]] and one.meta["labels"] == [38]
    joined = " | ".join(one.meta["problems"])
    assert "annotations[1]: box_zero_area" in joined and "annotations[2]: class_not_in_catalogue" in joined
    assert two.meta["boxes"] == [[90, 70, 100, 80]] and two.meta["labels"] == [13]  # clipped to the image
    assert "box_clipped" in two.meta["problems"][0]
    reasons = {(p.key.split(":")[-1], p.reason) for p in src.problems}
    assert ("images[2]", "missing_file") in reasons and ("annotations[3]", "label_without_image") in reasons


def test_coco_pack_counts_problems(coco_file, tmp_path):
    res = pack_scenes(ScenePackConfig(source=f"coco:{coco_file}", out=str(tmp_path / "p")))
    assert res.count == 2 and res.boxes == 2
    assert res.by_reason["label_without_image"] == 1 and res.by_reason["class_not_in_catalogue"] == 1
