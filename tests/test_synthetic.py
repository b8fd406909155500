"""The synthetic source and the corruptions it shares with training and evaluation.

The flip test here is the project's check that the catalogue's flip rules match what signs look
like: a flip augmentation built on ``LabelSpace.flip_map`` is only correct if an invariant sign
flips onto itself, a mirror sign onto its partner, and a "never" sign onto no sign at all.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from signscale.corruptions import CORRUPTIONS, apply_corruption
from signscale.data.sources import CONDITIONS, SourceError, open_source
from signscale.data.sources.pictograms import DESIGNS, design_of, render_clean, render_template
from signscale.data.sources.synthetic import SyntheticSource, open_synthetic
from signscale.labels import LabelSpace

SPACE = LabelSpace.for_country("de")
FLIP_SIZE = 48

# Mean absolute difference (0..255 levels) between clean renders at 48 px. Measured: invariant and
# mirror flips give 0.0 (drawn exactly symmetric / mirrored); a flipped "never" sign is at least
# 5.5 away from every clean sign (speed_limit_60, whose "09" shares the round 0); two different
# classes are at least 2.2 apart (speed_limit_30 vs speed_limit_80, which differ only in a digit).
SAME_AT_MOST = 0.5
NEVER_AT_LEAST = 3.0
DISTINCT_AT_LEAST = 1.0


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return np.stack([render_clean(c, FLIP_SIZE) for c in range(len(SPACE))])


@pytest.fixture(scope="module")
def clean_cn() -> np.ndarray:
    """Every class in the Chinese design (German where China's sign has no design of its own here)."""
    return np.stack([render_clean(c, FLIP_SIZE, "cn") for c in range(len(SPACE))])


# ---------------------------------------------------------------------------------- determinism


def test_same_seed_and_index_give_identical_pixels_in_any_order():
    a, b = SyntheticSource(n=40, seed=3), SyntheticSource(n=40, seed=3)
    first = [a.read(i) for i in (0, 17, 39)]
    later = [b.read(i) for i in (39, 17, 0)][::-1]  # reverse order: no hidden state between reads
    for x, y in zip(first, later):
        assert x.key == y.key and x.label == y.label and x.condition == y.condition
        np.testing.assert_array_equal(x.image, y.image)


def test_different_seed_gives_different_samples():
    a, b = SyntheticSource(n=5, seed=0), SyntheticSource(n=5, seed=1)
    assert all(not np.array_equal(a.read(i).image, b.read(i).image) for i in range(5))


def test_source_survives_pickling_for_worker_processes():
    src = SyntheticSource(n=10, seed=5, weather=0.5)
    clone = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(clone.read(4).image, src.read(4).image)


# ---------------------------------------------------------------------------------- samples


def test_samples_have_the_documented_fields():
    src = SyntheticSource(n=20, size=24, seed=7)
    for i in range(len(src)):
        s = src.read(i)
        assert s.image.shape == (24, 24, 3) and s.image.dtype == np.uint8
        assert s.key == f"synthetic/7/{i}" and s.track == f"synthetic-7-{i}"
        assert s.source == "synthetic" and s.country == "de"
        assert 0 <= s.label < len(SPACE)
        x1, y1, x2, y2 = s.roi
        assert 0 <= x1 < x2 <= 24 and 0 <= y1 < y2 <= 24
        assert s.condition in CONDITIONS


def test_entries_agree_with_read():
    src = SyntheticSource(n=60, seed=2, weather=0.5)
    entries = src.entries()
    assert len(entries) == len(src)
    for i, e in enumerate(entries):
        s = src.read(i)
        assert e.image is None
        assert (e.key, e.label, e.condition, e.roi, e.track, e.meta) == (s.key, s.label, s.condition, s.roi,
                                                                         s.track, s.meta)


def test_every_class_appears_roughly_balanced():
    labels = np.array([e.label for e in SyntheticSource(n=3000, seed=0).entries()])
    counts = np.bincount(labels, minlength=len(SPACE))
    assert (counts > 0).all(), f"missing classes: {np.flatnonzero(counts == 0).tolist()}"
    assert counts.min() > 0.4 * counts.mean()


def test_read_outside_the_source_is_an_index_error():
    with pytest.raises(IndexError):
        SyntheticSource(n=3).read(3)


# ---------------------------------------------------------------------------------- conditions


def test_conditions_are_tagged_in_the_configured_proportion():
    entries = SyntheticSource(n=2000, seed=0, weather=0.3).entries()
    conditions = [e.condition for e in entries]
    assert 0.25 < 1 - conditions.count("clear") / len(conditions) < 0.35
    assert set(conditions) == {"clear", *CORRUPTIONS}
    for e in entries:
        assert (e.meta["severity"] == 0) == (e.condition == "clear")
        assert 0 <= e.meta["severity"] <= 5


def test_weather_weights_and_extremes():
    only_snow = SyntheticSource(n=50, weather=1.0, conditions=("snow",)).entries()
    assert {e.condition for e in only_snow} == {"snow"}
    assert {e.condition for e in SyntheticSource(n=50, weather=0.0).entries()} == {"clear"}
    weighted = open_synthetic("", n="2000", weather="1", conditions="fog:3,night:1").entries()
    fog = sum(e.condition == "fog" for e in weighted) / len(weighted)
    assert 0.7 < fog < 0.8


# ---------------------------------------------------------------------------------- options


def test_open_source_from_a_spec():
    src = open_source("synthetic:?n=12&size=24&seed=2&weather=0")
    assert isinstance(src, SyntheticSource) and len(src) == 12
    s = src.read(11)
    assert s.image.shape == (24, 24, 3) and s.condition == "clear"
    assert src.describe()["spec"] == "synthetic:?n=12&size=24&seed=2&weather=0"


def test_classes_option_accepts_ids_and_keys():
    src = open_synthetic("", n="200", classes="1, speed_limit_50")
    assert {e.label for e in src.entries()} == {1, 2}


@pytest.mark.parametrize("option, value", [
    ("n", "many"), ("n", "-1"), ("size", "4"), ("size", "3.5"), ("seed", "-2"), ("weather", "1.5"),
    ("weather", "often"), ("conditions", "hail"), ("conditions", "snow:0"), ("conditions", "snow:x"),
    ("classes", "43"), ("classes", "no_such_sign"), ("designs", "fr"), ("designs", "de,fr"),
    ("designs", "de,de"), ("designs", ","), ("designs", "all"),
])
def test_bad_option_raises_source_error_naming_it(option, value):
    with pytest.raises(SourceError, match=f"'{option}'"):
        open_synthetic("", **{option: value})


def test_location_is_refused():
    with pytest.raises(SourceError, match="no location"):
        open_synthetic("/data/signs")


def test_unknown_option_is_reported_by_the_registry():
    with pytest.raises(SourceError, match="colour"):
        open_source("synthetic:?n=5&colour=red")


# ---------------------------------------------------------------------------------- rendering


def test_template_is_transparent_outside_and_opaque_inside():
    t = render_template(14, 64)
    assert t.shape == (64, 64, 4) and t.dtype == np.uint8
    assert t[0, 0, 3] == 0 and t[32, 32, 3] == 255


def test_clean_renders_of_different_classes_are_distinct(clean):
    flat = clean.reshape(len(clean), -1).astype(np.float32)
    for c in range(len(SPACE)):
        d = np.abs(flat - flat[c]).mean(axis=1)
        d[c] = np.inf
        other = int(d.argmin())
        assert d[other] > DISTINCT_AT_LEAST, f"{SPACE[c].key} looks like {SPACE[other].key} ({d[other]:.2f})"


@pytest.mark.parametrize("c", range(len(SPACE)), ids=[k for k in SPACE.keys])
def test_flip_rules_match_the_rendered_signs(c, clean):
    """THE flip test: a flipped image shows the class flip_map says, or no valid sign at all."""
    rule = SPACE[c].flip
    flipped = clean[c][:, ::-1]
    if rule == "invariant":
        assert _mad(flipped, clean[c]) < SAME_AT_MOST
    elif rule == "mirror":
        partner = SPACE.index(SPACE[c].mirror)
        assert _mad(flipped, clean[partner]) < SAME_AT_MOST
        assert _mad(flipped, clean[c]) > NEVER_AT_LEAST  # a mirror pair is not secretly symmetric
    else:
        distances = [_mad(flipped, clean[k]) for k in range(len(SPACE))]
        nearest = int(np.argmin(distances))
        assert distances[nearest] > NEVER_AT_LEAST, (
            f"flipped {SPACE[c].key} looks like {SPACE[nearest].key} ({distances[nearest]:.2f})")


# ---------------------------------------------------------------------------------- national designs


def test_chinese_design_differs_where_china_draws_the_meaning_its_own_way(clean, clean_cn):
    """Warning triangles yellow, no overtaking as arrows, limits in Chinese digits; the rest German."""
    own = {SPACE[c].key for c in range(len(SPACE)) if design_of(SPACE[c].key, "cn") == "cn"}
    assert {"general_caution", "pedestrians", "children_crossing", "no_passing", "speed_limit_60",
            "dangerous_curve_right"} <= own
    for c in range(len(SPACE)):
        differs = _mad(clean[c], clean_cn[c]) > NEVER_AT_LEAST
        assert differs == (SPACE[c].key in own), SPACE[c].key
    triangle = clean_cn[SPACE.index("general_caution")].astype(np.float32)
    r, g, b = triangle[FLIP_SIZE * 3 // 4, FLIP_SIZE // 4]  # inside the plate, beside the "!": yellow
    assert r > 200 and g > 150 and b < 80


def test_chinese_renders_of_different_classes_are_distinct(clean_cn):
    flat = clean_cn.reshape(len(clean_cn), -1).astype(np.float32)
    for c in range(len(SPACE)):
        d = np.abs(flat - flat[c]).mean(axis=1)
        d[c] = np.inf
        assert d.min() > DISTINCT_AT_LEAST, f"{SPACE[c].key} looks like {SPACE[int(d.argmin())].key}"


def test_each_design_renders_deterministically():
    for design in DESIGNS:
        first = render_template(SPACE.index("pedestrians"), 64, design)
        assert first.shape == (64, 64, 4)
        src = SyntheticSource(n=30, seed=4, designs=(design,))
        again = SyntheticSource(n=30, seed=4, designs=(design,))
        for i in (0, 13, 29):
            np.testing.assert_array_equal(src.read(i).image, again.read(i).image)


def test_default_is_the_german_design_and_unchanged_by_the_option():
    """Without the option, samples carry no design and are exactly ``designs=de``'s pixels."""
    plain, german = SyntheticSource(n=40, seed=6, weather=0.5), SyntheticSource(n=40, seed=6, weather=0.5,
                                                                                   designs=("de",))
    for i in range(40):
        a, b = plain.read(i), german.read(i)
        np.testing.assert_array_equal(a.image, b.image)
        assert a.meta == {"severity": a.meta["severity"]} and b.meta["design"] == "de"
    assert "designs" not in plain.describe() and german.describe()["designs"] == ["de"]


def test_design_is_drawn_apart_from_everything_else_and_mixes_both():
    """designs=mixed keeps label, weather and placement of the default sample; only the drawing changes."""
    plain, mixed = SyntheticSource(n=400, seed=2), open_synthetic("", n="400", seed="2", designs="mixed")
    drawn = [e.meta["design"] for e in mixed.entries()]
    for a, b in zip(plain.entries(), mixed.entries()):
        assert (a.label, a.condition, a.roi) == (b.label, b.condition, b.roi)
        assert b.meta["design"] == design_of(SPACE[b.label].key, b.meta["design"])
    has_cn = [design_of(SPACE[e.label].key, "cn") == "cn" for e in plain.entries()]
    share = sum(d == "cn" for d in drawn) / sum(has_cn)
    assert 0.4 < share < 0.6  # the meanings China draws its own way come in both designs, about half each
    cn = next(i for i, d in enumerate(drawn) if d == "cn")
    assert not np.array_equal(plain.read(cn).image, mixed.read(cn).image)
    np.testing.assert_array_equal(mixed.read(cn).image, pickle.loads(pickle.dumps(mixed)).read(cn).image)


@pytest.mark.parametrize("c", range(len(SPACE)), ids=[k for k in SPACE.keys])
def test_flip_rules_hold_for_the_chinese_drawings(c, clean_cn):
    """The flip test again, for the Chinese design: the catalogue's rules must hold for every drawing."""
    rule = SPACE[c].flip
    flipped = clean_cn[c][:, ::-1]
    if rule == "invariant":
        assert _mad(flipped, clean_cn[c]) < SAME_AT_MOST
    elif rule == "mirror":
        partner = SPACE.index(SPACE[c].mirror)
        assert _mad(flipped, clean_cn[partner]) < SAME_AT_MOST
        assert _mad(flipped, clean_cn[c]) > NEVER_AT_LEAST
    else:
        distances = [_mad(flipped, clean_cn[k]) for k in range(len(SPACE))]
        nearest = int(np.argmin(distances))
        assert distances[nearest] > NEVER_AT_LEAST, (
            f"flipped {SPACE[c].key} looks like {SPACE[nearest].key} ({distances[nearest]:.2f})")


def test_unknown_design_is_refused_when_rendering():
    with pytest.raises(ValueError, match="unknown sign design 'fr'"):
        render_template(0, 32, "fr")


# ---------------------------------------------------------------------------------- corruptions


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    return SyntheticSource(n=1, size=32, seed=11, weather=0.0).read(0).image


@pytest.mark.parametrize("severity", [1, 5])
@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corruption_is_deterministic_and_changes_the_image(kind, severity, scene):
    a = apply_corruption(scene, kind, severity, np.random.default_rng(9))
    b = apply_corruption(scene, kind, severity, np.random.default_rng(9))
    assert a.shape == scene.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert _mad(a, scene) > 1.0


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_higher_severity_moves_further_from_the_original(kind, scene):
    mild = apply_corruption(scene, kind, 1, np.random.default_rng(0))
    severe = apply_corruption(scene, kind, 5, np.random.default_rng(0))
    assert _mad(severe, scene) > _mad(mild, scene)


def test_corruption_accepts_a_batch(scene):
    batch = np.stack([scene, scene[::-1]])
    out = apply_corruption(batch, "rain", 3, np.random.default_rng(0))
    assert out.shape == batch.shape and out.dtype == np.uint8


def test_unknown_corruption_lists_the_valid_kinds(scene):
    with pytest.raises(ValueError, match="snow, rain, fog"):
        apply_corruption(scene, "hail", 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="1..5"):
        apply_corruption(scene, "fog", 0, np.random.default_rng(0))
