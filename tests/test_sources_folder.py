"""The folder source: class folders (keys or ids), CSV and JSONL lists, bad input as problems."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from signscale import storage
from signscale.data.sources import Problem, Sample, SourceError, open_source
from signscale.data.sources.folder import FolderSource, list_tree, open_folder, resolve_label
from signscale.labels import LabelError, LabelSpace

# modules these tests exercise through the ones they import (tests/test_layout.py)
COVERS = ("signscale.data.sources.base",)


def image(fmt: str, seed: int = 0, size: tuple[int, int] = (20, 16)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def write(root: Path, files: dict[str, bytes | str]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return root


@pytest.fixture
def class_folders(tmp_path: Path) -> Path:
    return write(tmp_path / "signs", {
        "keep_right/a.png": image("PNG", 1),
        "keep_right/more/b.jpg": image("JPEG", 2),  # deeper folders: the top folder decides
        "00014/c.ppm": image("PPM", 3),
        "2/d.png": image("PNG", 4),
        "no_such_sign/e.png": image("PNG", 5),
        "top.png": image("PNG", 6),
        "keep_right/notes.txt": "not an image",
        "keep_right/.hidden.png": b"junk",
        "2/broken.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 20,
    })


def by_key(source: FolderSource) -> dict[str, Sample | Problem]:
    return {e.key: source.read(i) for i, e in enumerate(source.entries())}


# --------------------------------------------------------------------------------------------- class folders

def test_class_folders_by_key_and_id(class_folders: Path) -> None:
    source = open_folder(str(class_folders))
    read = by_key(source)
    labels = {k: s.label for k, s in read.items() if isinstance(s, Sample)}
    assert labels == {"keep_right/a.png": 38, "keep_right/more/b.jpg": 38, "00014/c.ppm": 14, "2/d.png": 2,
                      "2/broken.png": 2}
    sample = read["keep_right/a.png"]
    assert isinstance(sample, Sample)
    assert sample.image == (class_folders / "keep_right/a.png").read_bytes()  # original bytes
    assert (sample.source, sample.country, sample.condition, sample.track) == ("folder", "de", "clear", None)


def test_class_folder_problems(class_folders: Path) -> None:
    source = open_folder(str(class_folders))
    assert source.problem_counts() == {"unknown_label": 1, "no_label": 1}
    read = by_key(source)
    unknown = read["no_such_sign/e.png"]
    assert isinstance(unknown, Problem) and unknown.reason == "unknown_label"
    assert "no_such_sign" in unknown.detail and unknown.key == "no_such_sign/e.png"
    assert read["top.png"].reason == "no_label"
    broken = read["2/broken.png"]  # the source hands over bytes; pack's decode quarantines them
    assert isinstance(broken, Sample) and broken.image
    assert source.describe()["skipped_files"] == 1 and ".hidden.png" not in str(read)


def test_an_id_outside_the_label_space_is_a_problem(tmp_path: Path) -> None:
    source = open_folder(str(write(tmp_path, {"43/a.png": image("PNG")})))
    problem = source.read(0)
    assert isinstance(problem, Problem) and problem.reason == "unknown_label" and "43" in problem.detail


def test_a_file_removed_after_listing_is_a_missing_file(class_folders: Path) -> None:
    source = open_folder(str(class_folders))
    index = [e.key for e in source.entries()].index("2/d.png")
    (class_folders / "2/d.png").unlink()
    assert source.read(index).reason == "missing_file"


def test_list_tree_is_relative_and_recursive(class_folders: Path) -> None:
    names = list_tree(str(class_folders))
    assert "keep_right/more/b.jpg" in names and "top.png" in names
    assert all(not n.startswith("/") for n in names)


# --------------------------------------------------------------------------------------------- lists

def test_csv_list(tmp_path: Path) -> None:
    write(tmp_path, {"imgs/a.png": image("PNG", 1), "imgs/b.jpg": image("JPEG", 2), "c.ppm": image("PPM", 3)})
    (tmp_path / "list.csv").write_text(
        "path,label\n"
        "imgs/a.png,keep_right\n"
        "imgs/b.jpg,00014\n"
        "c.ppm,2\n"
        "imgs/missing.png,3\n"
        "imgs/a.png,keep_left\n"  # duplicate
        "c.ppm,no_such_sign\n"
        "only-one-field\n"
        ",5\n")
    source = open_folder(str(tmp_path / "list.csv"))
    entries = source.entries()
    assert [(e.key, e.label) for e in entries[:3]] == [("imgs/a.png", 38), ("imgs/b.jpg", 14), ("c.ppm", 2)]
    assert [e.reason for e in entries[3:]] == ["missing_file", "duplicate_entry", "unknown_label", "bad_csv_row",
                                               "bad_csv_row"]
    assert "no_such_sign" in entries[5].detail and "list.csv:7" in entries[5].detail
    assert entries[6].key == "list.csv:8" and "list.csv:8" in entries[6].detail
    assert source.read(1).image == (tmp_path / "imgs/b.jpg").read_bytes()
    assert source.describe()["layout"] == "csv"


def test_jsonl_list_with_optional_fields(tmp_path: Path) -> None:
    write(tmp_path, {"a.png": image("PNG", 1), "b.png": image("PNG", 2)})
    rows = [{"path": "a.png", "label": 38, "condition": "snow", "track": "pole-7", "country": "de"},
            {"path": "b.png", "label": "yield"},
            {"path": "b.png", "label": 3, "condition": "sandstorm"},
            {"path": "a.png", "label": 3, "country": "cn"}]
    lines = [json.dumps(r) for r in rows] + ["{not json", "[1, 2]"]
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    source = open_folder(str(tmp_path / "list.jsonl"))
    a, b, *problems = source.entries()
    assert (a.label, a.condition, a.track, b.label, b.condition) == (38, "snow", "pole-7", 13, "clear")
    assert [p.reason for p in problems] == ["bad_condition", "country_mismatch", "bad_jsonl_row", "bad_jsonl_row"]
    assert "?country=cn" in problems[1].detail and "list.jsonl:5" in problems[2].detail
    assert source.read(0).condition == "snow"


def test_a_csv_without_the_header_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "list.csv").write_text("a.png,keep_right\n")
    with pytest.raises(SourceError, match="header row with the columns `path,label`"):
        open_folder(str(tmp_path / "list.csv"))


def test_lists_accept_absolute_paths(tmp_path: Path) -> None:
    write(tmp_path / "elsewhere", {"a.png": image("PNG")})
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists/list.csv").write_text(f"path,label\n{tmp_path / 'elsewhere/a.png'},keep_right\n")
    assert open_folder(str(tmp_path / "lists/list.csv")).read(0).label == 38


# --------------------------------------------------------------------------------------------- errors, options

def test_location_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file or folder"):
        open_folder(str(tmp_path / "missing"))
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(SourceError, match="not a .csv or .jsonl"):
        open_folder(str(tmp_path / "data.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images found"):
        open_folder(str(tmp_path / "empty"))
    with pytest.raises(SourceError, match="option country='xx'"):
        open_folder(str(tmp_path), country="xx")


def test_resolve_label() -> None:
    space = LabelSpace.for_country("de")
    assert [resolve_label(v, space) for v in ("keep_right", "38", "00038", 38, " 2 ")] == [38, 38, 38, 38, 2]
    for bad in ("keep_straight", 43, -1, True, 1.5):
        with pytest.raises(LabelError):
            resolve_label(bad, space)


def test_open_source_and_pickling(class_folders: Path) -> None:
    source = open_source(f"folder:{class_folders}?country=de")
    assert isinstance(source, FolderSource) and source.spec.startswith("folder:")
    restored = pickle.loads(pickle.dumps(source))
    assert [outcome(restored.read(i)) for i in range(len(restored))] == [
        outcome(source.read(i)) for i in range(len(source))]


def outcome(entry: Sample | Problem) -> tuple[str, object]:
    """What must match after a round trip (a PIL message in a problem's detail can hold an address)."""
    return (entry.key, entry.image) if isinstance(entry, Sample) else (entry.key, entry.reason)


def test_reads_through_fsspec_urls() -> None:
    root = "memory://signscale-tests/folder"
    storage.write_bytes(f"{root}/keep_left/a.png", image("PNG"))
    storage.write_bytes(f"{root}/list.csv", b"path,label\nkeep_left/a.png,39\n")
    try:
        assert open_folder(root).read(0).label == 39
        assert open_folder(f"{root}/list.csv").read(0).key == "keep_left/a.png"
    finally:
        storage.delete(f"{root}/keep_left/a.png")
        storage.delete(f"{root}/list.csv")
