"""gtsdb: folder and zip, scenes with no signs and with three, the official split, bad lines by line number."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from signscale.data.scene_shards import ScenePackConfig, pack_scenes
from signscale.data.sources import SourceError
from signscale.data.sources.scenes import open_scene_source

GT = """00000.ppm;10;12;29;31;14
00001.ppm;5;5;24;24;1
00001.ppm;40;10;59;29;38
00001.ppm;70;30;85;45;13
00001.ppm;10;10;20;20;99
00001.ppm;150;150;170;170;2
00001.ppm;30;30;30;40;2
00009.ppm;1;1;10;10;3
this line is broken
00600.ppm;1;2;21;22;17
"""


def _write_fixture(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("00000.ppm", "00001.ppm", "00002.ppm", "00600.ppm"):
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(root / name)
    (root / "gt.txt").write_text(GT)


@pytest.fixture
def gtsdb_dir(tmp_path) -> Path:
    root = tmp_path / "FullIJCNN2013"
    _write_fixture(root)
    return root


def test_scene_without_signs_and_scene_with_three(gtsdb_dir):
    src = open_scene_source(f"gtsdb:{gtsdb_dir}")
    by_key = {src.read(i).key: src.read(i) for i in range(len(src))}
    assert sorted(by_key) == ["00000.ppm", "00001.ppm", "00002.ppm", "00600.ppm"]
    empty = by_key["00002.ppm"]
    assert empty.meta["boxes"] == [] and empty.meta["labels"] == []
    three = by_key["00001.ppm"]
    # x2/y2 in gt.txt are inclusive; scene boxes end exclusively
    assert three.meta["boxes"] == [[5, 5, 25, 25], [40, 10, 60, 30], [70, 30, 86, 46]]
    assert three.meta["labels"] == [1, 38, 13]
    assert three.meta["width"] == 96 and three.meta["height"] == 64
    reasons = " | ".join(three.meta["problems"])
    assert "gt.txt:6: box_outside_image" in reasons


def test_file_level_problems_are_named_by_line(gtsdb_dir):
    src = open_scene_source(f"gtsdb:{gtsdb_dir}")
    got = {(p.key, p.reason) for p in src.problems}
    assert ("gt.txt:5", "class_not_in_catalogue") in got
    assert ("gt.txt:8", "label_without_image") in got
    assert ("gt.txt:9", "bad_line") in got
    assert ("gt.txt:7", "box_zero_area") in got
    assert src.describe()["problems"] == {"class_not_in_catalogue": 1, "label_without_image": 1, "bad_line": 1,
                                          "box_zero_area": 1}


def test_official_split(gtsdb_dir):
    train = open_scene_source(f"gtsdb:{gtsdb_dir}?split=train")
    test = open_scene_source(f"gtsdb:{gtsdb_dir}?split=test")
    assert [train.read(i).key for i in range(len(train))] == ["00000.ppm", "00001.ppm", "00002.ppm"]
    assert [test.read(i).key for i in range(len(test))] == ["00600.ppm"]
    assert test.read(0).meta["labels"] == [17]
    with pytest.raises(SourceError, match="split"):
        open_scene_source(f"gtsdb:{gtsdb_dir}?split=val")


def test_zip_reads_like_the_folder(gtsdb_dir, tmp_path):
    zpath = tmp_path / "FullIJCNN2013.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for f in sorted(gtsdb_dir.iterdir()):
            z.write(f, f"FullIJCNN2013/{f.name}")
    a, b = open_scene_source(f"gtsdb:{gtsdb_dir}"), open_scene_source(f"gtsdb:{zpath}")
    assert len(a) == len(b)
    for i in range(len(a)):
        assert a.read(i).meta == b.read(i).meta


def test_giant_scene_is_a_problem_not_a_crash(gtsdb_dir):
    src = open_scene_source(f"gtsdb:{gtsdb_dir}?max_pixels=1000")
    p = src.read(0)
    assert p.reason == "too_many_pixels"


def test_pack_reports_every_problem_with_file_and_line(gtsdb_dir, tmp_path):
    out = tmp_path / "packed"
    res = pack_scenes(ScenePackConfig(source=f"gtsdb:{gtsdb_dir}", out=str(out), image_format="png"))
    assert res.count == 4 and res.boxes == 5
    lines = [json.loads(x) for x in (out / "quarantine.jsonl").read_text().splitlines()]
    where = {(q["key"] if q["index"] < 0 else q["detail"].split(": ")[0], q["reason"]) for q in lines}
    assert ("gt.txt:5", "class_not_in_catalogue") in where
    assert ("gt.txt:6", "box_outside_image") in where
    assert ("gt.txt:7", "box_zero_area") in where
    assert res.by_reason["bad_line"] == 1


def test_missing_gt_is_a_clear_error(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(SourceError, match="gt.txt"):
        open_scene_source(f"gtsdb:{tmp_path / 'x'}")


def _jpeg_zip(path: Path, ids: list[int], size: tuple[int, int] = (816, 480)) -> Path:
    """A zip laid out like the shared real copy: GTSDB_train/NNNNN.jpg + gt.txt with .jpg names."""
    rng = np.random.default_rng(1)
    lines = []
    with zipfile.ZipFile(path, "w") as z:
        for n in ids:
            im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
            z.writestr(f"GTSDB_train/{n:05d}.jpg", buf.getvalue())
            lines.append(f"{n:05d}.jpg;{10 + n % 7};20;{30 + n % 7};41;{n % 43}")
        z.writestr("GTSDB_train/gt.txt", "\n".join(lines) + "\n")
    return path


def test_real_copy_layout_jpeg_names_and_inclusive_corners(tmp_path):
    z = _jpeg_zip(tmp_path / "GTSDB_real.zip", [0, 1, 12])
    src = open_scene_source(f"gtsdb:{z}")
    assert len(src) == 3 and src.describe()["boxes"] == 3
    s = src.read(2)
    assert s.key == "00012.jpg" and s.meta["width"] == 816 and s.meta["height"] == 480
    assert s.meta["boxes"] == [[15, 20, 36, 42]] and s.meta["labels"] == [12]  # x2/y2 inclusive in gt.txt
    assert s.meta["problems"] == []  # 816x480 is a known GTSDB size


def test_pack_format_original_keeps_each_frames_own_bytes(tmp_path):
    from signscale.data import shards
    from signscale.data.manifest import Manifest

    z = _jpeg_zip(tmp_path / "GTSDB_real.zip", [0, 1, 12])
    res = pack_scenes(ScenePackConfig(source=f"gtsdb:{z}", out=str(tmp_path / "ds"), image_format="original"))
    assert res.count == 3
    m = Manifest.load(str(tmp_path / "ds"))
    stored = [b for s in range(len(m.shards)) for b in shards.ShardReader(m.shard_url(s)).blobs_at(
        np.arange(m.shards[s].count))]
    with zipfile.ZipFile(z) as f:
        originals = {f.read(f"GTSDB_train/{n:05d}.jpg") for n in (0, 1, 12)}
    assert set(map(bytes, stored)) == originals  # the JPEGs as they were, not re-encoded as PNG


def test_frame_id_blocks_split_train_and_val_with_no_frame_on_both_sides(tmp_path):
    ids = list(range(0, 600, 7)) + [640]
    z = _jpeg_zip(tmp_path / "g.zip", ids, size=(136, 80))
    train = open_scene_source(f"gtsdb:{z}?split=train&val_block=400-449,550-599")
    val = open_scene_source(f"gtsdb:{z}?split=val&val_block=400-449,550-599")
    t = {int(train.read(i).key[:5]) for i in range(len(train))}
    v = {int(val.read(i).key[:5]) for i in range(len(val))}
    assert not t & v and t | v == {n for n in ids if n < 600}  # the official test ids stay out of both
    assert v == {n for n in ids if 400 <= n <= 449 or 550 <= n <= 599}
    assert "unexpected_size 136x80" in " ".join(val.read(0).meta["problems"])  # kept, and said
    whole = open_scene_source(f"gtsdb:{z}?split=train")
    assert len(whole) == len(t) + len(v)
    with pytest.raises(SourceError, match="split=val needs the frame ids"):
        open_scene_source(f"gtsdb:{z}?split=val")
    with pytest.raises(SourceError, match=r"val_block='500-4': expected inclusive frame-id ranges"):
        open_scene_source(f"gtsdb:{z}?split=train&val_block=500-4")


def test_zip_with_frames_but_no_gt_txt_says_so(tmp_path):
    z = tmp_path / "no-gt.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("GTSDB_train/00001.jpg", b"\xff\xd8")
    with pytest.raises(SourceError, match="no gt.txt found"):
        open_scene_source(f"gtsdb:{z}")
