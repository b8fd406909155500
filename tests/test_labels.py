"""The sign catalogue and label space: ids, keys, flip rules, serialisation and error messages."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from signscale.labels import CATEGORIES, GTSRB, LabelError, LabelSpace, SignClass, category_ids

SPACE = LabelSpace.for_country("de")

# Manifests and models store this fingerprint; if it changes, every packed dataset and trained model
# would be read against a different numbering. Change it only together with a label-space format bump.
DE_FINGERPRINT = "ccbd91badb27a59e"


def test_gtsrb_has_43_classes_numbered_in_order():
    assert len(SPACE) == 43
    assert [c.country_id for c in SPACE.classes] == list(range(43))
    assert all(c.country == "de" for c in SPACE.classes)


def test_keys_are_unique_and_indexable():
    assert len(set(SPACE.keys)) == len(SPACE)
    for i, key in enumerate(SPACE.keys):
        assert SPACE.index(key) == i
    assert SPACE.index("stop") == 14 and SPACE[14].shape == "octagon"


def test_every_class_has_a_known_shape_and_category():
    shapes = {"circle", "triangle", "inverted_triangle", "octagon", "diamond"}
    assert {c.shape for c in SPACE.classes} <= shapes
    assert {c.category for c in SPACE.classes} <= set(CATEGORIES)


def test_mirror_relation_is_symmetric():
    for c in SPACE.classes:
        if c.flip == "mirror":
            partner = SPACE[SPACE.index(c.mirror)]
            assert partner.flip == "mirror" and partner.mirror == c.key, c.key
            assert partner.key != c.key
        else:
            assert c.mirror is None, c.key


@pytest.mark.parametrize("key, expected", [
    ("keep_right", "keep_left"), ("keep_left", "keep_right"), ("turn_right_ahead", "turn_left_ahead"),
    ("dangerous_curve_left", "dangerous_curve_right"), ("straight_or_right", "straight_or_left"),
    ("priority_road", "priority_road"), ("no_entry", "no_entry"), ("yield", "yield"),
    ("speed_limit_30", None), ("stop", None), ("roundabout", None), ("end_all_limits", None),
])
def test_flip_map_on_known_classes(key, expected):
    m = SPACE.flip_map()
    assert m[SPACE.index(key)] == (-1 if expected is None else SPACE.index(expected))


def test_flip_map_is_an_involution():
    m = SPACE.flip_map()
    assert m.dtype == np.int64 and m.shape == (43,)
    flippable = m >= 0
    np.testing.assert_array_equal(m[m[flippable]], np.flatnonzero(flippable))


def test_round_trip_through_json_keeps_the_label_space_and_fingerprint():
    back = LabelSpace.from_dict(json.loads(json.dumps(SPACE.to_dict())))
    assert back == SPACE
    assert back.fingerprint() == SPACE.fingerprint() == DE_FINGERPRINT
    np.testing.assert_array_equal(back.flip_map(), SPACE.flip_map())


def test_fingerprint_changes_with_numbering_or_content():
    reordered = LabelSpace(classes=tuple(reversed(GTSRB)), name="de")
    assert reordered.fingerprint() != SPACE.fingerprint()
    renamed = LabelSpace(classes=(replace(GTSRB[0], name="Speed limit 20"), *GTSRB[1:]), name="de")
    assert renamed.fingerprint() != SPACE.fingerprint()


def test_from_dict_refuses_an_unknown_format():
    with pytest.raises(LabelError, match="format 99"):
        LabelSpace.from_dict({**SPACE.to_dict(), "format": 99})


def test_unknown_country_lists_the_known_ones():
    with pytest.raises(LabelError, match=r"unknown country 'xx'.*known catalogues: be, cn, de"):
        LabelSpace.for_country("xx")


def test_unknown_key_names_the_label_space():
    with pytest.raises(LabelError, match="'speed_limit_130' is not in label space 'de'"):
        SPACE.index("speed_limit_130")


def test_check_id_names_where_the_bad_id_came_from():
    assert SPACE.check_id(42) == 42 and SPACE.check_id(np.int64(0)) == 0
    with pytest.raises(LabelError, match=r"^GT-final_test.csv row 7: class id 43 is outside .*\(0\.\.42\)"):
        SPACE.check_id(43, "GT-final_test.csv row 7")
    with pytest.raises(LabelError, match="class id -1"):
        SPACE.check_id(-1)


def test_label_space_refuses_duplicate_keys_and_dangling_mirrors_in_the_gtsrb_catalogue():
    with pytest.raises(LabelError, match="appears twice"):
        LabelSpace(classes=(GTSRB[0], GTSRB[0]), name="bad")
    with pytest.raises(LabelError, match="mirrors to 'keep_left'"):
        LabelSpace(classes=(GTSRB[38],), name="bad")


def test_sign_class_requires_mirror_exactly_for_mirror_flips():
    with pytest.raises(ValueError, match="'mirror' must be set"):
        SignClass(key="x", name="x", country="de", country_id=0, category="other", shape="circle",
                  colours=("white",), flip="mirror")
    with pytest.raises(ValueError, match="flip must be"):
        SignClass(key="x", name="x", country="de", country_id=0, category="other", shape="circle",
                  colours=("white",), flip="sometimes")  # type: ignore[arg-type]


def test_category_ids_follow_the_category_order():
    ids = category_ids(SPACE)
    assert ids.shape == (43,)
    assert ids[SPACE.index("speed_limit_30")] == CATEGORIES.index("prohibitory")
    assert ids[SPACE.index("general_caution")] == CATEGORIES.index("danger")
    assert ids[SPACE.index("keep_right")] == CATEGORIES.index("mandatory")
    assert ids[SPACE.index("stop")] == CATEGORIES.index("other")


# ---------------------------------------------------------------------------------------------
# Countries: catalogues and merged label spaces

def _cls(country: str, cid: int, key: str, flip: str = "never", mirror: str | None = None,
         uncertain: bool = False) -> SignClass:
    return SignClass(key=key, name=key, country=country, country_id=cid, category="other", shape="circle",
                     colours=("white",), flip=flip, mirror=mirror, uncertain=uncertain)  # type: ignore[arg-type]


A = LabelSpace(classes=(_cls("aa", 0, "stop"), _cls("aa", 1, "keep_right", "mirror", "keep_left"),
                        _cls("aa", 2, "keep_left", "mirror", "keep_right"), _cls("aa", 3, "only_a")), name="aa")
B = LabelSpace(
    classes=(
        _cls("bb", 0, "only_b"),
        _cls("bb", 1, "stop"),
        _cls("bb", 2, "keep_right", "mirror", "keep_left"),
        _cls("bb", 3, "guess", uncertain=True),
    ),
    name="bb",
)


def test_merge_by_meaning_shares_outputs_for_the_same_key_and_appends_new_ones():
    m = LabelSpace.merge([A, B], by="meaning")
    assert m.keys == ["stop", "keep_right", "keep_left", "only_a", "only_b", "bb:guess"]
    assert m.members_of(0) == (("aa", 0), ("bb", 1)) and m.members_of(4) == (("bb", 0),)
    np.testing.assert_array_equal(m.map_from(A), [0, 1, 2, 3])  # the first space keeps its ids
    np.testing.assert_array_equal(m.map_from(B), [4, 0, 1, 5])
    # bb has keep_right without keep_left: in the merged space the mirror partner exists, so it flips
    assert m.flip_map()[1] == 2 and m.flip_map()[0] == -1
    assert LabelSpace.merge([A, B], by="meaning", trust_uncertain=True).keys[-1] == "guess"


def test_merging_a_merged_space_again_keeps_one_output_per_uncertain_class():
    # adding a country later merges the model's (already merged) space with the data's spaces again
    m = LabelSpace.merge([A, B], by="meaning")
    again = LabelSpace.merge([m, B], by="meaning")
    assert again.keys == m.keys == ["stop", "keep_right", "keep_left", "only_a", "only_b", "bb:guess"]
    np.testing.assert_array_equal(again.map_from(B), m.map_from(B))
    # a space saved by an older merge, whose uncertain key carries the prefix twice, joins the same output
    old = LabelSpace(classes=m.classes[:5] + (replace(m.classes[5], key="bb:bb:guess"),), name=m.name, by="meaning",
                     members=m.members)
    assert LabelSpace.merge([old, B], by="meaning").keys == m.keys


def test_merge_by_design_keeps_each_country_apart_but_reports_the_semantic_key():
    m = LabelSpace.merge([A, B], by="design")
    assert len(m) == 8 and m.keys[:2] == ["aa:stop", "aa:keep_right"] and m.keys[5] == "bb:stop"
    assert m[5].key == "stop" and m[5].country == "bb"  # the meaning is still there
    np.testing.assert_array_equal(m.map_from(B), [4, 5, 6, 7])
    assert m.flip_map()[1] == 2 and m.flip_map()[6] == -1  # bb has no keep_left design: no flip


def test_merged_space_round_trips_and_single_catalogues_keep_their_fingerprint():
    m = LabelSpace.for_countries("de,cn", by="meaning")
    back = LabelSpace.from_dict(json.loads(json.dumps(m.to_dict())))
    assert back == m and back.fingerprint() == m.fingerprint() != DE_FINGERPRINT
    assert LabelSpace.for_countries("de").fingerprint() == DE_FINGERPRINT


def test_de_cn_by_meaning_shares_the_common_signs_and_gives_cn_only_classes_new_ids():
    cn = LabelSpace.for_country("cn")  # TSRD23's catalogue alone ("cn" in for_countries adds TT100K)
    m = LabelSpace.merge([LabelSpace.for_country("de"), cn], by="meaning")
    lut = m.map_from(cn)
    for key, de_id in [("speed_limit_60", 3), ("no_entry", 17), ("yield", 13), ("keep_right", 38),
                       ("turn_right_ahead", 33)]:
        assert lut[cn.index(key)] == de_id, key
    for key in ("motor_vehicle_lane", "no_honking", "speed_limit_40"):
        assert lut[cn.index(key)] >= 43, key
    assert len(m) == 43 + 12 and lut[15] == 9  # cn 15 is GTSRB's no passing in another design
    # cn yield carries text and must not flip; de yield may: the merged class takes the stricter rule
    assert m.flip_map()[m.index("yield")] == -1


def test_merge_refuses_contradicting_flip_rules_naming_both_classes():
    bad = LabelSpace(classes=(_cls("bb", 0, "keep_right", "invariant"),), name="bb")
    with pytest.raises(LabelError, match=r"aa:keep_right.*bb:keep_right"):
        LabelSpace.merge([A, bad])


def test_mapping_a_space_whose_class_lands_on_two_outputs_is_an_error():
    merged = LabelSpace.merge([A, B], by="meaning")
    by_design = LabelSpace.merge([A, B], by="design")
    with pytest.raises(LabelError, match="maps to several classes"):
        by_design.map_from(merged)  # merged 'stop' is both aa:stop and bb:stop


def test_catalogues_ship_de_cn_be_with_their_own_ids_and_uncertainty_marked():
    from signscale.labels import CATALOGUES

    assert {k: len(v) for k, v in CATALOGUES.items()} == {"de": 43, "cn": 23, "be": 62, "tt100k": 200, "bg": 1}
    for country, cat in CATALOGUES.items():
        assert [c.country_id for c in cat] == list(range(len(cat)))
        assert all(c.country == country for c in cat)
    assert not any(c.uncertain for c in CATALOGUES["cn"])  # class 15 was checked against TT100K's p1
    unchecked = [c.country_id for c in CATALOGUES["be"] if c.uncertain]  # the be classes not identified by eye
    assert unchecked == [9, 11, 15, 26, 33, 36, 48, 50, 52]
    merged = LabelSpace.for_countries("de,be")
    assert "be:cattle" in merged.keys and "cattle" not in merged.keys  # uncertain be classes stay apart
