"""The Belgian catalogue agrees with the class meanings identified by eye from BelgiumTSC's images (issue 22)."""

from __future__ import annotations

from signscale.labels import CATALOGUES, LabelSpace

BE = LabelSpace.for_country("be")

# BelgiumTSC class -> GTSRB class of the same meaning, as the check listed them
SAME_AS_GTSRB = {0: 22, 2: 23, 3: 19, 4: 20, 5: 21, 7: 28, 8: 29, 10: 25, 13: 18, 16: 24, 17: 11, 19: 13, 21: 14,
                 22: 17, 25: 16, 28: 15, 31: 9, 34: 35, 37: 40, 61: 12}

# BelgiumTSC class -> meaning, for the checked classes GTSRB has no class for
OTHERS = {1: "speed_bump", 12: "level_crossing_gates", 14: "road_narrows_both", 18: "intersection_priority_right",
          20: "two_way_traffic", 23: "no_bicycles", 24: "weight_limit", 27: "height_limit", 29: "no_left_turn",
          30: "no_right_turn", 32: "speed_limit", 35: "mandatory_arrows_mixed", 38: "bicycle_path",
          39: "pedestrian_bicycle_path", 40: "no_parking", 41: "no_stopping", 44: "priority_over_oncoming",
          45: "parking", 51: "residential_zone", 53: "one_way", 54: "dead_end", 55: "end_of_zone",
          56: "pedestrian_crossing", 57: "bicycle_crossing", 59: "speed_bump_info", 60: "end_priority_road"}


def test_be_classes_map_onto_gtsrb_classes_as_the_check_listed():
    merged = LabelSpace.merge([LabelSpace.for_country("de"), BE], by="meaning")
    lut = merged.map_from(BE)
    assert {be: int(lut[be]) for be in SAME_AS_GTSRB} == SAME_AS_GTSRB
    # every other be class has an output of its own after GTSRB's 43
    assert all(lut[i] >= 43 for i in range(len(BE)) if i not in SAME_AS_GTSRB)


def test_be_classes_without_a_gtsrb_twin_carry_the_checked_meaning():
    assert {i: BE[i].key for i in OTHERS} == OTHERS
    assert not any(BE[i].uncertain for i in [*SAME_AS_GTSRB, *OTHERS])
    assert [BE[i].key for i in (42, 43)] == ["no_parking_days_1_15", "no_parking_days_16_31"]
    assert all(BE[i].key.startswith("parking") for i in (45, 46, 47, 49, 58))
    assert BE[6].key.startswith("double_curve")


def test_be_speed_limits_map_to_the_family_never_to_one_value():
    merged = LabelSpace.for_countries("de,cn,be", by="meaning")
    c = merged[merged.index("speed_limit")]
    assert {m[0] for m in merged.members_of(merged.index("speed_limit"))} == {"be"} and not c.uncertain
    for value in (30, 50, 60):
        assert ("be", 32) not in merged.members_of(merged.index(f"speed_limit_{value}"))


def test_be_classes_the_check_did_not_name_stay_uncertain_and_apart():
    assert [c.country_id for c in CATALOGUES["be"] if c.uncertain] == [9, 11, 15, 26, 33, 36, 48, 50, 52]
    merged = LabelSpace.merge([LabelSpace.for_country("de"), BE], by="meaning")
    assert merged.index("be:traffic_signals") != merged.index("traffic_signals")  # be 11 does not join de 26
