"""TT100K: the code catalogue (families, bad codes), the ``tt100k:`` source and its panorama-held-out split."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from signscale import tt100k_codes
from signscale.data.sources import Problem, Sample, open_source
from signscale.data.sources.tt100k import panorama_groups, panorama_split
from signscale.labels import LabelSpace

SHARED_TT100K = Path(__file__).resolve().parents[2] / "shared" / "data" / "TT100K_crops_train_64px.zip"
TT = LabelSpace.for_country("tt100k")


def _key(code: str) -> str:
    return TT[tt100k_codes.lookup(code)].key


# ---------------------------------------------------------------------------------------------
# Codes


@pytest.mark.parametrize("code, key", [
    ("pl40", "speed_limit_40"), ("pl5", "speed_limit_5"), ("pl120", "speed_limit_120"),
    ("il50", "minimum_speed_50"), ("pr40", "end_speed_limit_40"), ("ph3.5", "height_limit_3.5m"),
    ("ph4", "height_limit_4m"), ("pw3.2", "width_limit_3.2m"), ("pm10", "weight_limit_10t"),
    ("pa13", "axle_load_limit_13t"),
])
def test_every_value_family_is_parsed_from_the_code(code, key):
    assert _key(code) == key
    c = TT[tt100k_codes.lookup(code)]
    assert c.name.endswith(f"[{code}]") and c.flip == "never" and not c.uncertain  # digits never flip


def test_a_family_value_is_read_in_canonical_form():
    assert tt100k_codes.lookup("pl040") == tt100k_codes.lookup("pl40")
    assert tt100k_codes.lookup("ph3.50") == tt100k_codes.lookup("ph3.5")


@pytest.mark.parametrize("code, reason, hint", [
    ("plx", "bad_value", "needs a number"), ("pl", "bad_value", "needs a number"),
    ("ph3.5.1", "bad_value", "needs a number"), ("pm-5", "bad_value", "needs a number"),
    ("pl45", "unknown_code", "append the line 'pl45'"), ("p99", "unknown_code", "not in the tt100k catalogue"),
    ("", "unknown_code", "not in the tt100k catalogue"), ("PL40", "unknown_code", "not in the tt100k catalogue"),
])
def test_bad_codes_are_refused_with_the_reason_and_the_fix(code, reason, hint):
    with pytest.raises(tt100k_codes.CodeError, match=hint) as info:
        tt100k_codes.lookup(code)
    assert info.value.reason == reason and info.value.code == code


def test_fixed_codes_share_keys_with_gtsrb_and_tsrd23_by_meaning():
    expected = {"pne": "no_entry", "i5": "keep_right", "i6": "keep_left", "ps": "stop", "pg": "yield",
                "p11": "no_honking", "pn": "no_stopping", "pb": "no_vehicles", "p1": "no_passing", "w57": "pedestrians",
                "w63": "general_caution", "i10": "turn_right_ahead", "i13": "ahead_only", "w22": "side_road_right"}
    assert {code: _key(code) for code in expected} == expected
    merged = LabelSpace.for_countries("de,cn", by="meaning")
    members = {k: {m[0] for m in merged.members_of(merged.index(k))} for k in
               ("speed_limit_60", "no_entry", "yield", "stop", "keep_right", "speed_limit_40")}
    assert members == {"speed_limit_60": {"de", "cn", "tt100k"}, "no_entry": {"de", "cn", "tt100k"},
                       "yield": {"de", "cn", "tt100k"}, "stop": {"de", "tt100k"}, "keep_right": {"de", "cn", "tt100k"},
                       "speed_limit_40": {"cn", "tt100k"}}
    # catch-alls and doubtful rows never merge; the merged yield never flips (its Chinese designs carry text)
    assert "tt100k:other_prohibitory" in merged.keys and merged.flip_map()[merged.index("yield")] == -1


def test_the_catalogue_table_refuses_rows_that_would_make_ids_ambiguous():
    head = "\t".join(tt100k_codes.COLUMNS)
    good = f"{head}\nps\tstop\tother\toctagon\tred,white\tnever\t\t\tStop\npl40\n"
    assert [r.key for r in tt100k_codes.parse_table(good)] == ["stop", "speed_limit_40"]
    for text, match in [(good + "pl40\n", "code 'pl40' already on line 3"),
                        (good + "pl050\n", "not canonical; write pl50"),
                        (good + "p5\n", "code 'p5' has no key"),
                        ("code\tkey\n" + "pl40\n", "first line must be the header")]:
        with pytest.raises(ValueError, match=match):
            tt100k_codes.parse_table(text)


# ---------------------------------------------------------------------------------------------
# The source, on a tiny generated copy of the layout


def _jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (20, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tt_zip(tmp_path_factory) -> str:
    """73 crops of 4 classes over 30 panoramas, 3 of background, and one of each kind of bad entry."""
    path = tmp_path_factory.mktemp("tt100k") / "TT100K_crops_train_64px.zip"
    codes = ["pl40", "pne", "i5", "ph3.5"]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("TT100K_codes.tsv", "code\tenglish\tchinese\n")  # the data's own table: not an image
        n = 0
        for p in range(30):
            pano = 1000 + 40 * p + (3 if p % 3 else 0)  # some panoramas lie close to the next one
            for code in codes[: 1 + p % 4]:
                z.writestr(f"TT100K_train/{code}/{pano}_{n}.jpg", _jpeg(n))
                n += 1
        for k in range(3):
            z.writestr(f"TT100K_train/negative/{5000 + 100 * k}.jpg", _jpeg(900 + k))
        z.writestr("TT100K_train/pl45/77_0.jpg", _jpeg(1001))   # a value the catalogue has no row for
        z.writestr("TT100K_train/plx/78_0.jpg", _jpeg(1002))    # not a number
        z.writestr("TT100K_train/zz9/79_0.jpg", _jpeg(1003))    # no such code
        z.writestr("TT100K_train/pl40/crop.jpg", _jpeg(1004))   # no panorama id
        z.writestr("TT100K_train/pne/9999_1.jpg", b"\xff\xd8 not a jpeg")  # does not decode
    return str(path)


def test_source_reads_codes_background_and_names_every_bad_entry(tt_zip):
    from signscale.data.show import show

    src = open_source(f"tt100k:{tt_zip}")
    entries = src.entries()
    good = [e for e in entries if isinstance(e, Sample)]
    bad = {e.key: e for e in entries if isinstance(e, Problem)}
    space = src.label_space
    assert {space[s.label].key for s in good} == {"speed_limit_40", "no_entry", "keep_right", "height_limit_3.5m",
                                                   "not_a_sign"}
    assert all(s.country == "cn" and s.meta["code"] in s.key for s in good)
    neg = [s for s in good if s.meta["code"] == "negative"]
    assert len(neg) == 3 and {s.label for s in neg} == {space.background_id}
    assert {k: p.reason for k, p in bad.items()} == {
        "TT100K_train/pl45/77_0.jpg": "unknown_code", "TT100K_train/plx/78_0.jpg": "bad_value",
        "TT100K_train/zz9/79_0.jpg": "unknown_code", "TT100K_train/pl40/crop.jpg": "bad_name"}
    assert "pl45" in bad["TT100K_train/pl45/77_0.jpg"].detail
    assert "code pl40" in bad["TT100K_train/pl40/crop.jpg"].detail
    undecodable = src.read(next(i for i, e in enumerate(entries) if e.key == "TT100K_train/pne/9999_1.jpg"))
    assert isinstance(undecodable, Problem) and "9999_1.jpg (code pne)" in undecodable.detail
    summary = show(f"tt100k:{tt_zip}")
    assert summary.samples == len(good) == 73 + 3 + 1 and summary.classes == 5  # the bad jpeg shows in read
    assert summary.problem_reasons == {"unknown_code": 2, "bad_value": 1, "bad_name": 1}


def test_pack_counts_the_bad_entries_and_the_crop_that_does_not_decode(tt_zip, tmp_path):
    from signscale.data.pack import PackConfig, pack

    res = pack(
        PackConfig(source=f"tt100k:{tt_zip}", out=str(tmp_path / "tt"), image_size=16, workers=0, progress=False)
    )
    assert res.count == 73 + 3 and res.quarantined == 5
    assert res.by_reason.get("unknown_code") == 2 and res.by_reason.get("bad_value") == 1
    assert "quarantined" in res.summary()


# ---------------------------------------------------------------------------------------------
# The panorama split


def test_neighbouring_panoramas_are_chained_into_one_group():
    panoramas = np.array([100, 103, 110, 200, 119, 209, 500, 100, -1])
    g = panorama_groups(panoramas, neighbours=10)
    assert g[0] == g[1] == g[2] == g[4] == g[7]  # 100-103-110-119: each within 10 of the next
    assert g[3] == g[5] != g[0] and g[6] not in (g[0], g[3]) and g[8] < 0  # no panorama id: a group alone
    assert len(set(panorama_groups(panoramas, neighbours=0)[:8].tolist())) == 7  # only one panorama's own crops


@pytest.mark.parametrize("neighbours", [0, 3, 10])
def test_no_panorama_or_neighbour_is_on_both_sides_of_the_split(neighbours):
    rng = np.random.default_rng(neighbours)
    panoramas = rng.integers(0, 60000, 2000)  # about as sparse as the real ids (6,705 in 0..98,887)
    labels = rng.integers(0, 12, 2000)
    train, val = panorama_split(panoramas, labels, val_fraction=0.2, seed=1, neighbours=neighbours)
    assert len(train) + len(val) == 2000 and not set(train.tolist()) & set(val.tolist())
    assert 0.1 < len(val) / 2000 < 0.3
    gaps = np.abs(panoramas[train][:, None] - panoramas[val][None, :])
    assert gaps.min() > neighbours


def test_source_split_keeps_panoramas_apart_and_is_stable(tt_zip):
    sides = {s: open_source(f"tt100k:{tt_zip}?split={s}&val_fraction=0.3&neighbours=10") for s in ("train", "val")}
    panos = {s: {e.meta["panorama"] for e in src.entries() if isinstance(e, Sample)} for s, src in sides.items()}
    assert panos["train"] and panos["val"]
    assert min(abs(a - b) for a in panos["train"] for b in panos["val"]) > 10
    again = open_source(f"tt100k:{tt_zip}?split=val&val_fraction=0.3&neighbours=10")
    assert [e.key for e in again.entries()] == [e.key for e in sides["val"].entries()]
    with pytest.raises(ValueError, match="neighbours=.-1."):
        open_source(f"tt100k:{tt_zip}?neighbours=-1")


# ---------------------------------------------------------------------------------------------
# The real copy


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_TT100K.exists(), reason=f"real TT100K crops not found at {SHARED_TT100K}")
def test_real_tt100k_has_17127_samples_in_152_classes_and_a_panorama_held_out_split():
    src = open_source(f"tt100k:{SHARED_TT100K}")
    entries = src.entries()
    assert all(isinstance(e, Sample) for e in entries)  # every code of the copy has a catalogue row
    assert len(entries) == 17127 and len({e.label for e in entries}) == 152
    train = open_source(f"tt100k:{SHARED_TT100K}?split=train")
    val = open_source(f"tt100k:{SHARED_TT100K}?split=val")
    pt = np.array(sorted({e.meta["panorama"] for e in train.entries()}))
    pv = np.array(sorted({e.meta["panorama"] for e in val.entries()}))
    assert len(train) + len(val) == 17127 and np.abs(pt[:, None] - pv[None, :]).min() > 10
