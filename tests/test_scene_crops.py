"""scene-crops: the signs of a packed scene dataset as crops, cut as the detect pipeline cuts them."""

from __future__ import annotations

import json
import pickle
from collections import Counter

import numpy as np
import pytest

from signscale import images
from signscale.data import shards
from signscale.data.manifest import Manifest
from signscale.data.pack import PackConfig, pack
from signscale.data.scene_shards import ScenePackConfig, iter_scenes, pack_scenes
from signscale.data.sources import Problem, Sample, SourceError, open_source

TINY = "scenes-synthetic:?n=6&seed=3&width=160&height=112&min_px=8&max_px=30&max_signs=4"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> str:
    """A packed scene dataset of 6 small scenes in two shards (PNG, so pixels survive exactly)."""
    out = str(tmp_path_factory.mktemp("scenes") / "scenes")
    res = pack_scenes(ScenePackConfig(source=TINY, out=out, shard_mb=0.02, image_format="png"))
    assert res.count == 6 and res.boxes >= 6 and res.shards >= 2  # crops cross a shard boundary
    return out


def _boxes(url: str) -> list[tuple[np.ndarray, list[int], int]]:
    """(scene pixels, box, label) of every box, decoded independently of the source."""
    return [(img, box, label) for img, extra in iter_scenes(url) for box, label in zip(extra["boxes"], extra["labels"])]


def _same(a: Sample | Problem, b: Sample | Problem) -> bool:
    if isinstance(a, Problem) or isinstance(b, Problem):
        return a == b
    return a.without_image() == b.without_image() and np.array_equal(a.image, b.image)


def test_one_sample_per_box_and_copy_and_small_boxes_are_problems(scenes):
    boxes = _boxes(scenes)
    src = open_source(f"scene-crops:{scenes}?copies=3&min_px=0")
    items = list(src)
    assert len(src) == len(boxes) * 3 and all(isinstance(s, Sample) for s in items)
    assert [s.key for s in items[:3]] == ["scene-0000000#box0#c0", "scene-0000000#box0#c1", "scene-0000000#box0#c2"]

    min_px = 12
    small = sum(max(b[2] - b[0], b[3] - b[1]) < min_px for _, b, _ in boxes)
    assert 0 < small < len(boxes)  # the tiny set has boxes on both sides of the threshold
    src = open_source(f"scene-crops:{scenes}?copies=2&min_px={min_px}")
    items = list(src)
    problems = [s for s in items if isinstance(s, Problem)]
    assert len(src) == len(boxes) * 2
    assert len(problems) == small * 2 and {p.reason for p in problems} == {"box_too_small"}
    assert sum(isinstance(s, Sample) for s in items) == (len(boxes) - small) * 2
    # the cheap listing agrees with what read() gives, without pixels
    listed = src.entries()
    assert [x.key for x in listed] == [x.key for x in items]
    assert [type(x) for x in listed] == [type(x) for x in items]
    assert all(x.image is None for x in listed if isinstance(x, Sample))


def test_without_jitter_each_crop_is_the_box_pixel_for_pixel(scenes):
    boxes = _boxes(scenes)
    src = open_source(f"scene-crops:{scenes}?jitter=0&margin=0&copies=2&min_px=0")
    manifest = Manifest.load(scenes)
    assert src.label_space.fingerprint() == manifest.label_space.fingerprint()
    for b, (scene, box, label) in enumerate(boxes):
        expected = images.crop_box(scene, tuple(box))
        for k in range(2):
            s = src.read(2 * b + k)
            assert isinstance(s, Sample)
            assert s.image.dtype == np.uint8 and s.image.ndim == 3
            assert np.array_equal(s.image, expected), s.key
            assert s.label == label and s.meta["box"] == box == s.meta["jittered"]
            assert s.roi == (0, 0, expected.shape[1], expected.shape[0])
    tracks = {src.read(i).track for i in range(len(src))}
    scene_of = {src.read(i).track: src.read(i).meta["scene"] for i in range(len(src))}
    assert len(tracks) == len({s.meta["scene"] for s in src}) == len(set(scene_of.values()))
    # margin is passed to crop_box exactly as the pipeline passes it
    wide = open_source(f"scene-crops:{scenes}?jitter=0&margin=0.2&min_px=0")
    scene, box, _ = boxes[0]
    assert np.array_equal(wide.read(0).image, images.crop_box(scene, tuple(float(v) for v in box), margin=0.2))


def test_jitter_is_deterministic_by_seed_and_index(scenes):
    spec = f"scene-crops:{scenes}?jitter=0.2&copies=2&seed=7&min_px=0"
    a, b = open_source(spec), open_source(spec)
    n = len(a)
    forward = [a.read(i) for i in range(n)]
    assert all(_same(x, y) for x, y in zip(forward, [b.read(i) for i in range(n)]))
    assert all(_same(x, y) for x, y in zip(forward, reversed([b.read(i) for i in reversed(range(n))])))
    copy = pickle.loads(pickle.dumps(a))  # as a pack or DataLoader worker receives it
    assert all(_same(forward[i], copy.read(i)) for i in (n - 1, 0, n // 2))
    jittered = [s.meta["jittered"] for s in forward]
    assert any(j != s.meta["box"] for j, s in zip(jittered, forward))
    assert jittered[0] != jittered[1]  # two copies of one box differ
    other = open_source(spec.replace("seed=7", "seed=8"))
    assert [other.read(i).meta["jittered"] for i in range(n)] != jittered
    for s in forward:  # centre within jitter x size, sides scaled by at most 1 +- jitter
        (x1, y1, x2, y2), (j1, k1, j2, k2) = s.meta["box"], s.meta["jittered"]
        w, h = x2 - x1, y2 - y1
        assert abs((j1 + j2 - x1 - x2) / 2) <= 0.2 * w + 0.01 and abs((k1 + k2 - y1 - y2) / 2) <= 0.2 * h + 0.01
        assert 0.8 * w - 0.01 <= j2 - j1 <= 1.2 * w + 0.01 and 0.8 * h - 0.01 <= k2 - k1 <= 1.2 * h + 0.01


def test_roi_marks_the_jittered_box_inside_a_crop_with_margin(scenes):
    wide = open_source(f"scene-crops:{scenes}?jitter=0.2&margin=0.3&copies=2&seed=1&min_px=0")
    tight = open_source(f"scene-crops:{scenes}?jitter=0.2&margin=0&copies=2&seed=1&min_px=0")
    listed = wide.entries()
    for i in range(len(wide)):
        w, t = wide.read(i), tight.read(i)
        assert w.meta == t.meta and w.roi == listed[i].roi  # same jittered box; the listing knows the ROI
        assert w.image.shape[0] >= t.image.shape[0] and w.image.shape[1] >= t.image.shape[1]
        assert np.array_equal(images.crop_box(w.image, w.roi), t.image)  # pack --crop roi drops the margin


def test_min_px_above_every_box_gives_only_box_too_small_problems(scenes):
    src = open_source(f"scene-crops:{scenes}?min_px=1000")
    items = list(src)
    assert items and all(isinstance(p, Problem) and p.reason == "box_too_small" for p in items)
    assert "min_px=1000" in items[0].detail


def test_a_non_scene_dataset_or_a_bad_option_is_a_clear_error(tmp_path, scenes):
    crops = str(tmp_path / "crops")
    pack(PackConfig(source="synthetic:?n=20&size=16", out=crops, image_size=16, workers=0, progress=False))
    with pytest.raises(SourceError, match="pack-scenes") as exc:
        open_source(f"scene-crops:{crops}")
    assert crops in str(exc.value)
    with pytest.raises(SourceError, match="pack-scenes"):
        open_source(f"scene-crops:{tmp_path / 'nothing-here'}")
    with pytest.raises(SourceError, match=r"jitter=.*e\.g\. jitter=0\.1"):
        open_source(f"scene-crops:{scenes}?jitter=lots")
    with pytest.raises(SourceError, match="copies=0 is outside"):
        open_source(f"scene-crops:{scenes}?copies=0")


def test_pack_scene_crops_end_to_end(tmp_path, scenes):
    spec = f"scene-crops:{scenes}?jitter=0.1&copies=2&min_px=12"
    src = open_source(spec)
    items = list(src)
    good = [s for s in items if isinstance(s, Sample)]
    out = str(tmp_path / "crops")
    res = pack(PackConfig(source=spec, out=out, image_size=32, workers=0, progress=False, dedup=False))
    assert res.count == len(good) and res.quarantined == len(items) - len(good)
    assert res.by_reason == {"box_too_small": len(items) - len(good)}
    m = Manifest.load(out)
    assert m.count == len(good) and m.data["source"]["dataset_checksum"] == Manifest.load(scenes).checksum()
    recs = np.concatenate([shards.ShardReader(m.shard_url(i)).records() for i in range(len(m.shards))])
    assert Counter(recs["label"].tolist()) == Counter(s.label for s in good)
    assert recs["image"].shape[1:] == (32, 32, 3)
    i0 = next(i for i, s in enumerate(items) if isinstance(s, Sample))
    stored = next(r for r in recs if r["id"] == i0)
    assert np.array_equal(stored["image"], images.resize(items[i0].image, 32))


def test_background_and_mined_negatives_are_not_a_sign_crops_away_from_signs(tmp_path, scenes):
    from signscale.data.sources.scene_crops import box_iou_one
    from signscale.labels import BACKGROUND_KEY

    boxes = _boxes(scenes)
    plain = open_source(f"scene-crops:{scenes}?min_px=0")
    assert plain.label_space.background_id is None  # nothing asked: the scene set's own space
    keys = [k.split("#")[0] for k in (s.key for s in plain)]
    mined = tmp_path / "false_alarms.json"
    # one mined box far from every sign, one on top of the first sign (a true sign, never "not a sign")
    first_box = [float(v) for v in boxes[0][1]]
    mined.write_text(json.dumps({keys[0]: [[1, 1, 11, 11, 0.9], first_box + [0.8]]}))
    src = open_source(f"scene-crops:{scenes}?min_px=0&background=2&negatives={mined}")
    space = src.label_space
    bg = space.background_id
    assert bg == len(plain.label_space) and space[bg].key == BACKGROUND_KEY
    assert [space.ident(space[i]) for i in range(bg)] == plain.label_space.keys  # sign ids unchanged
    items = list(src)
    signs = [s for s in items if s.label != bg]
    not_signs = [s for s in items if s.label == bg]
    assert len(signs) == len(boxes) and [s.key for s in signs] == [s.key for s in plain]
    assert 6 <= len(not_signs) <= 2 * 6 + 1
    assert sum("#neg" in s.key for s in not_signs) == 1  # the box on the sign was not used
    by_scene: dict[str, np.ndarray] = {}
    for s in signs:
        by_scene.setdefault(s.track, []).append(s.meta["box"])
    for s in not_signs:  # background never overlaps a sign of its scene
        truth = np.asarray(by_scene.get(s.track, []), dtype=np.float64).reshape(-1, 4)
        assert (box_iou_one(np.asarray(s.meta["box"]), truth) < 0.05).all(), s.key
        assert s.image.ndim == 3 and s.image.shape[2] == 3
    again = list(open_source(f"scene-crops:{scenes}?min_px=0&background=2&negatives={mined}"))
    assert all(_same(a, b) for a, b in zip(items, again))  # deterministic by (seed, scene)


def test_bad_negatives_file_names_the_row(tmp_path, scenes):
    bad = tmp_path / "fa.json"
    bad.write_text(json.dumps({"scene-0000000": [[5, 5, 2, 9, 0.5]]}))
    with pytest.raises(SourceError, match=r"scene 'scene-0000000' row 0: expected \[x1, y1, x2, y2, score\]"):
        open_source(f"scene-crops:{scenes}?negatives={bad}")
    with pytest.raises(SourceError, match="cannot read it"):
        open_source(f"scene-crops:{scenes}?negatives={tmp_path / 'missing.json'}")
