"""GTSRB sources: both layouts, folder and zip, bad input as problems, the track-aware split, real data.

Fixtures are tiny GTSRB trees generated here. Their CSVs give ORIGINAL sizes (64x48) that differ from
the decoded ones (32x32, 48x24), as in the shared copy of GTSRB, so ROI scaling is really exercised.
"""

from __future__ import annotations

import io
import multiprocessing
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from signscale import storage
from signscale.data.sources import Problem, Sample, Source, SourceError, Subset, open_source
from signscale.data.sources.gtsrb import (
    GtsrbSource,
    open_gtsrb_test,
    open_gtsrb_train,
    parse_gt_csv,
    scale_roi,
    sign_sizes,
    sized_track_split,
    track_split,
)
from signscale.images import decode

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REAL_ZIP = DATA / "GTSRB_Final_Training_Images.zip"
HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"
PREFIX = "GTSRB/Final_Training/Images/"
# class -> decoded image size (w, h); every CSV row says 64x48 with ROI (8, 6, 56, 42)
CLASSES = {0: (32, 32), 14: (32, 32), 38: (48, 24)}
TRACKS, FRAMES = 3, 2


def ppm(size: tuple[int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PPM")
    return buf.getvalue()


def csv_bytes(rows: list[str]) -> bytes:
    return ("\r\n".join([HEADER, *rows]) + "\r\n").encode()  # the official files use CRLF


def training_files(prefix: str = PREFIX) -> dict[str, bytes]:
    """A clean training tree: 3 classes x 3 tracks x 2 frames = 18 images."""
    files: dict[str, bytes] = {}
    for cls, size in CLASSES.items():
        rows = []
        for track in range(TRACKS):
            for frame in range(FRAMES):
                name = f"{track:05d}_{frame:05d}.ppm"
                files[f"{prefix}{cls:05d}/{name}"] = ppm(size, cls * 100 + track * 10 + frame)
                rows.append(f"{name};64;48;8;6;56;42;{cls}")
        files[f"{prefix}{cls:05d}/GT-{cls:05d}.csv"] = csv_bytes(rows)
    return files


def broken_training_files() -> dict[str, bytes]:
    """The clean tree plus one of each kind of bad input."""
    files = training_files()
    c14 = f"{PREFIX}00014/"
    rows = files[c14 + "GT-00014.csv"].decode().splitlines()[1:]
    files[c14 + "00007_00000.ppm"] = ppm((32, 32), 7)
    rows += ["00009_00000.ppm;64;48;8;6;56;42;14",  # names a file that is not there -> missing_file
             "garbage;12;oops",  # -> bad_csv_row, line 9
             "00007_00000.ppm;64;48;8;6;56;42;99"]  # -> label_out_of_range
    files[c14 + "GT-00014.csv"] = csv_bytes(rows)
    files[f"{PREFIX}00000/00005_00000.ppm"] = ppm((32, 32), 5)  # no CSV row -> no_label
    files[f"{PREFIX}00038/00001_00001.ppm"] = b"P6\n48 24\n255\n" + b"\x00" * 100  # truncated
    files[f"{PREFIX}00038/00002_00000.ppm"] = b"this is not an image"
    return files


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def write_zip(path: Path, files: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def train_zip(tmp_path: Path) -> Path:
    return write_zip(tmp_path / "GTSRB_Final_Training_Images.zip", training_files())


@pytest.fixture
def broken_zip(tmp_path: Path) -> Path:
    return write_zip(tmp_path / "broken.zip", broken_training_files())


# --------------------------------------------------------------------------------------------- layout

def test_zip_and_folder_give_identical_samples(tmp_path: Path, train_zip: Path) -> None:
    folder = write_folder(tmp_path / "extracted", training_files())
    from_zip, from_folder = open_gtsrb_train(str(train_zip)), open_gtsrb_train(str(folder))
    assert len(from_zip) == len(from_folder) == 18
    assert from_zip.entries() == from_folder.entries()
    assert [from_zip.read(i) for i in range(18)] == [from_folder.read(i) for i in range(18)]
    assert from_zip.describe()["format"] == "zip" and from_folder.describe()["format"] == "folder"


@pytest.mark.parametrize("prefix", ["", "Final_Training/Images/", "some/other/place/"])
def test_layout_is_found_under_any_prefix(tmp_path: Path, prefix: str) -> None:
    source = open_gtsrb_train(str(write_zip(tmp_path / "t.zip", training_files(prefix))))
    assert len(source) == 18 and isinstance(source.read(0), Sample)
    assert source.read(0).key == "00000/00000_00000.ppm"


def test_folder_may_be_given_at_any_level(tmp_path: Path) -> None:
    write_folder(tmp_path, training_files())
    for location in (tmp_path, tmp_path / "GTSRB", tmp_path / "GTSRB/Final_Training/Images"):
        assert len(open_gtsrb_train(str(location) + "/")) == 18


def test_entries_come_from_the_csvs_without_pixels(train_zip: Path) -> None:
    entries = open_gtsrb_train(str(train_zip)).entries()
    first = entries[0]
    assert isinstance(first, Sample)
    assert (first.key, first.label, first.track, first.source) == ("00000/00000_00000.ppm", 0, "00000/00000", "gtsrb")
    assert (first.country, first.condition, first.image, first.roi) == ("de", "clear", None, None)
    assert first.meta == {"csv_size": (64, 48), "csv_roi": (8, 6, 56, 42)}
    assert [e.key for e in entries] == sorted(e.key for e in entries)
    assert {e.track for e in entries if isinstance(e, Sample)} == {
        f"{c:05d}/{t:05d}" for c in CLASSES for t in range(TRACKS)}


def test_read_scales_the_roi_to_the_decoded_size(train_zip: Path) -> None:
    source = open_gtsrb_train(str(train_zip))
    by_class = {s.label: s for s in map(source.read, range(len(source))) if isinstance(s, Sample)}
    # CSV: 64x48 image, ROI (8, 6, 56, 42). Decoded 32x32 -> x*0.5, y*2/3; decoded 48x24 -> x*0.75, y*0.5
    assert by_class[0].roi == (4, 4, 28, 28)
    assert by_class[38].roi == (6, 3, 42, 21)
    assert decode(by_class[38].image).shape == (24, 48, 3)
    assert by_class[38].meta["csv_roi"] == (8, 6, 56, 42)  # the original is kept


def test_scale_roi_rounds_clips_and_never_returns_an_empty_box() -> None:
    assert scale_roi((5, 6, 24, 25), (29, 30), (32, 32)) == (6, 6, 26, 27)
    assert scale_roi((0, 0, 300, 300), (250, 250), (32, 32)) == (0, 0, 32, 32)  # ROI past the CSV size
    assert scale_roi((10, 10, 11, 11), (250, 250), (32, 32)) == (1, 1, 2, 2)  # sub-pixel -> one pixel
    assert scale_roi((249, 0, 250, 1), (250, 250), (32, 32)) == (31, 0, 32, 1)


def test_parse_gt_csv_finds_columns_by_name_and_reports_bad_lines() -> None:
    data = (b"ClassId;Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2\n"
            b"3;a.ppm;30;30;5;5;25;25\n\n4;b.ppm;x;30;5;5;25;25\n")
    (n1, row), (n2, bad) = parse_gt_csv(data)
    assert (n1, row.filename, row.class_id, row.width) == (2, "a.ppm", 3, 30)
    assert n2 == 4 and "non-integer" in bad


# --------------------------------------------------------------------------------------------- bad input

def test_bad_entries_are_problems_with_counts(broken_zip: Path) -> None:
    source = open_gtsrb_train(str(broken_zip))
    assert source.problem_counts() == {"missing_file": 1, "bad_csv_row": 1, "label_out_of_range": 1,
                                       "no_label": 1}
    problems = {p.reason: p for p in source.entries() if isinstance(p, Problem)}
    assert problems["missing_file"].key == "00014/00009_00000.ppm"
    assert "GT-00014.csv line 9" in problems["bad_csv_row"].detail
    assert problems["label_out_of_range"].key == "00014/00007_00000.ppm"
    assert problems["no_label"].key == "00000/00005_00000.ppm"
    assert len(source) == 18 + 4  # the unreadable images replace clean ones; listing cannot tell them apart


def test_unreadable_images_are_problems_from_read_or_decode(broken_zip: Path) -> None:
    """A non-image fails at read (its header is needed for the ROI); a truncated body passes the header
    and is caught by the full decode that pack does, with its own reason."""
    from signscale.images import ImageError, decode

    source = open_gtsrb_train(str(broken_zip))
    index = {e.key: i for i, e in enumerate(source.entries())}
    assert all(isinstance(source.entries()[index[k]], Sample)  # listing cannot know
               for k in ("00038/00001_00001.ppm", "00038/00002_00000.ppm"))
    problem = source.read(index["00038/00002_00000.ppm"])
    assert isinstance(problem, Problem) and problem.reason == "not_an_image"
    assert "00038/00002_00000.ppm" in problem.detail
    truncated = source.read(index["00038/00001_00001.ppm"])
    assert isinstance(truncated, Sample)
    with pytest.raises(ImageError) as info:
        decode(truncated.image)
    assert info.value.reason == "truncated"


def test_a_class_folder_without_csv_makes_its_images_unlabelled(tmp_path: Path) -> None:
    files = training_files()
    del files[f"{PREFIX}00038/GT-00038.csv"]
    source = open_gtsrb_train(str(write_zip(tmp_path / "t.zip", files)))
    assert source.problem_counts() == {"no_label": TRACKS * FRAMES}


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file or folder.*GTSRB_Final_Training_Images.zip"):
        open_gtsrb_train(str(tmp_path / "nope.zip"))


def test_a_zip_that_is_not_gtsrb_is_a_clear_error(tmp_path: Path) -> None:
    other = write_zip(tmp_path / "holiday.zip", {"photos/beach.jpg": b"..."})
    with pytest.raises(SourceError, match="holds no GTSRB training layout.*GT-000NN.csv"):
        open_gtsrb_train(str(other))


def test_a_file_that_is_not_a_zip_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match="neither a zip archive nor a folder"):
        open_gtsrb_train(str(tmp_path / "notes.txt"))
    (tmp_path / "cut.zip").write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    with pytest.raises(SourceError, match="damaged"):
        open_gtsrb_train(str(tmp_path / "cut.zip"))


def test_layouts_point_at_each_other(train_zip: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="open it with gtsrb:"):
        open_gtsrb_test(str(train_zip))
    test_zip = write_zip(tmp_path / "test.zip", official_test_files())
    with pytest.raises(SourceError, match="gtsrb-test:"):
        open_gtsrb_train(str(test_zip))


@pytest.mark.parametrize("options, bad", [({"split": "validation"}, "split"), ({"val_fraction": "1.5"}, "val_fraction"),
                                          ({"val_fraction": "abc"}, "val_fraction"), ({"seed": "x"}, "seed"),
                                          ({"stratify": "area"}, "stratify")])
def test_bad_options_are_named(train_zip: Path, options: dict[str, str], bad: str) -> None:
    with pytest.raises(SourceError, match=f"option {bad}="):
        open_gtsrb_train(str(train_zip), **options)


def test_open_source_spec(train_zip: Path) -> None:
    val = open_source(f"gtsrb:{train_zip}?split=val&val_fraction=0.34&seed=1")
    assert isinstance(val, Subset) and val.describe()["subset"] == "val"
    assert 0 < len(val) < 18
    with pytest.raises(SourceError, match="unexpected keyword"):
        open_source(f"gtsrb:{train_zip}?colour=red")


# --------------------------------------------------------------------------------------------- test layout

def official_test_files(csv_place: str = "beside", with_labels: bool = True) -> dict[str, bytes]:
    images = "GTSRB/Final_Test/Images/"
    files = {f"{images}{i:05d}.ppm": ppm((32, 32), 1000 + i) for i in range(4)}
    rows = [f"{i:05d}.ppm;64;48;8;6;56;42;{(0, 14, 38, 14)[i]}" for i in range(4)]
    if with_labels:
        csv_dir = {"beside": images, "above": "GTSRB/", "root": ""}[csv_place]
        files[csv_dir + "GT-final_test.csv"] = csv_bytes(rows)
    no_class = [r.rsplit(";", 1)[0] for r in rows]
    files[images + "GT-final_test.test.csv"] = ("\n".join([HEADER.rsplit(";", 1)[0], *no_class]) + "\n").encode()
    return files


@pytest.mark.parametrize("csv_place", ["beside", "above", "root"])
def test_test_layout_with_the_csv_beside_or_above(tmp_path: Path, csv_place: str) -> None:
    files = official_test_files(csv_place)
    for location in (write_zip(tmp_path / "test.zip", files), write_folder(tmp_path / "test", files)):
        source = open_gtsrb_test(str(location))
        samples = [source.read(i) for i in range(len(source))]
        assert [(s.key, s.label, s.track, s.source) for s in samples] == [
            ("00000.ppm", 0, None, "gtsrb-test"), ("00001.ppm", 14, None, "gtsrb-test"),
            ("00002.ppm", 38, None, "gtsrb-test"), ("00003.ppm", 14, None, "gtsrb-test")]
        assert samples[0].roi == (4, 4, 28, 28)


def test_test_labels_from_the_gt_option(tmp_path: Path) -> None:
    files = official_test_files(with_labels=False)
    images = write_zip(tmp_path / "GTSRB_Final_Test_Images.zip", files)
    with pytest.raises(SourceError, match="no ClassId.*gt=PATH"):
        open_gtsrb_test(str(images))
    labels = official_test_files()["GTSRB/Final_Test/Images/GT-final_test.csv"]
    (tmp_path / "GT-final_test.csv").write_bytes(labels)
    gt_zip = write_zip(tmp_path / "GTSRB_Final_Test_GT.zip", {"GT-final_test.csv": labels})
    for gt in (tmp_path / "GT-final_test.csv", gt_zip):
        source = open_source(f"gtsrb-test:{images}?gt={gt}")
        assert [source.read(i).label for i in range(4)] == [0, 14, 38, 14]
    with pytest.raises(SourceError, match="option gt="):
        open_gtsrb_test(str(images), gt=str(tmp_path / "missing.csv"))


# --------------------------------------------------------------------------------------------- split

def test_track_split_holds_out_whole_tracks_per_class() -> None:
    rng = np.random.default_rng(0)
    tracks, labels = [], []
    for cls in range(5):
        for t in range(int(rng.integers(2, 12))):
            n = int(rng.integers(5, 30))
            tracks += [f"{cls}/{t}"] * n
            labels += [cls] * n
    tracks += ["9/0"] * 7  # a class with a single track stays in training
    labels += [9] * 7
    train, val = track_split(tracks, labels, 0.2, seed=0)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(tracks)))
    train_tracks, val_tracks = {tracks[i] for i in train}, {tracks[i] for i in val}
    assert not train_tracks & val_tracks
    for cls in range(5):
        assert {labels[i] for i in train} >= {cls} and {labels[i] for i in val} >= {cls}
    assert 9 not in {labels[i] for i in val}
    assert 0.1 < len(val) / len(tracks) < 0.3


def test_track_split_is_deterministic_by_seed_and_order_free() -> None:
    tracks = [f"{c}/{t}" for c in range(3) for t in range(40) for _ in range(3)]
    labels = [int(t.split("/")[0]) for t in tracks]
    a, b = track_split(tracks, labels, 0.25, seed=7), track_split(tracks, labels, 0.25, seed=7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], track_split(tracks, labels, 0.25, seed=8)[1])
    # the same tracks go to validation whatever order the entries come in
    order = np.random.default_rng(1).permutation(len(tracks))
    _, val = track_split([tracks[i] for i in order], [labels[i] for i in order], 0.25, seed=7)
    assert {tracks[order[i]] for i in val} == {tracks[i] for i in a[1]}


def test_track_split_untracked_entries_stand_alone() -> None:
    train, val = track_split([None] * 20 + [""] * 20, [0] * 20 + [1] * 20, 0.1, seed=0)
    assert len(val) == 4 and len(train) == 36
    with pytest.raises(ValueError, match="val_fraction"):
        track_split(["a"], [0], 1.0, seed=0)


def test_sized_split_holds_out_one_whole_track_per_size_bin_of_each_class() -> None:
    # class 0: 20 tracks whose signs grow with the track number; class 1: 7 tracks; class 2: one track
    tracks, labels, sizes = [], [], []
    for cls, n in ((0, 20), (1, 7), (2, 1)):
        for t in range(n):
            tracks += [f"{cls}/{t:03d}"] * 30
            labels += [cls] * 30
            sizes += [20 + 5 * t + f // 10 for f in range(30)]  # median 21 + 5t: track t's size rank is t
    for seed in range(8):
        train, val = sized_track_split(tracks, labels, np.array(sizes), 0.1, seed)
        held = {tracks[i] for i in val}
        assert held.isdisjoint({tracks[i] for i in train}) and len(train) + len(val) == len(tracks)
        assert all(sum(tracks[i] == t for i in val) == 30 for t in held)  # whole tracks only
        big = sorted(int(t.split("/")[1]) for t in held if t.startswith("0/"))
        assert len(big) == 2 and big[0] < 10 <= big[1]  # one from the smaller half of the sizes, one from the larger
        assert sum(t.startswith("1/") for t in held) == 1 and not any(t.startswith("2/") for t in held)
    picks = {tuple(sized_track_split(tracks, labels, np.array(sizes), 0.1, seed)[1]) for seed in range(8)}
    assert len(picks) > 1  # the seed chooses within each bin
    with pytest.raises(ValueError, match="sizes"):
        sized_track_split(tracks, labels, np.array(sizes[:-1]), 0.1, 0)


@pytest.mark.slow
def test_sized_split_on_gtsrb_matches_the_pool_in_class_and_size() -> None:
    """The property stratify=size claims, on the real training set (CSV sizes only, no image is read)."""
    from conftest import GTSRB_ZIP, require

    zip_path = str(require(GTSRB_ZIP))
    source = open_gtsrb_train(zip_path)
    t = source.table
    size, tracks = sign_sizes(t.boxes), np.array(t.tracks)
    for seed in range(5):
        train, val = source.split_indices(0.1, seed, "size")
        assert set(tracks[train]).isdisjoint(tracks[val]) and len(train) + len(val) == len(tracks)
        assert abs((size[val] < 30).mean() - (size < 30).mean()) < 0.012  # the far-away signs' share
        assert abs(np.median(size[val]) - np.median(size)) <= 1
        for c in range(43):  # every class sends ~10% of its images
            assert abs(np.isin(np.flatnonzero(t.labels == c), val).mean() - 0.1) < 0.05, (seed, c)
    a = open_source(f"gtsrb:{zip_path}?split=val&stratify=size&seed=3")
    b = open_source(f"gtsrb:{zip_path}?split=train&stratify=size&seed=3")
    assert sorted(keys(a) + keys(b)) == sorted(t.keys) and "stratify=size" in a.spec


def keys(source: Source) -> list[str]:
    return [e.key for e in source.entries()]


def tracks(source: Source) -> set[str | None]:
    return {e.track for e in source.entries() if isinstance(e, Sample)}


def test_split_option_gives_disjoint_sides_covering_everything(broken_zip: Path) -> None:
    everything = open_gtsrb_train(str(broken_zip))
    train = open_gtsrb_train(str(broken_zip), split="train", val_fraction="0.34", seed="3")
    val = open_gtsrb_train(str(broken_zip), split="val", val_fraction="0.34", seed="3")
    assert sorted(keys(train) + keys(val)) == sorted(keys(everything))
    assert not tracks(train) & tracks(val)
    assert {e.label for e in val.entries() if isinstance(e, Sample)} == set(CLASSES)
    again = open_gtsrb_train(str(broken_zip), split="val", val_fraction="0.34", seed="3")
    assert keys(again) == keys(val)


# --------------------------------------------------------------------------------------------- processes

def test_sources_survive_pickling(train_zip: Path) -> None:
    source = open_gtsrb_train(str(train_zip))
    before = source.read(3)  # the zip is open now; pickling must drop the handle
    restored = pickle.loads(pickle.dumps(source))
    assert restored.read(3) == before
    val = open_gtsrb_train(str(train_zip), split="val")
    assert pickle.loads(pickle.dumps(val)).read(0) == val.read(0)


def _read_key(args: tuple[GtsrbSource, int]) -> str:
    source, index = args
    sample = source.read(index)
    return f"{sample.key}:{len(sample.image)}" if isinstance(sample, Sample) else sample.reason


def test_forked_workers_reopen_the_zip(train_zip: Path) -> None:
    source = open_gtsrb_train(str(train_zip))
    source.read(0)  # opened in the parent; forked children must not share its file offset
    expected = [_read_key((source, i)) for i in range(len(source))]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(_read_key, [(source, i) for i in range(len(source))]) == expected


def test_reads_through_fsspec_urls() -> None:
    url = "memory://signscale-tests/gtsrb.zip"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in training_files().items():
            zf.writestr(name, data)
    storage.write_bytes(url, buf.getvalue())
    try:
        source = open_gtsrb_train(url)
        assert len(source) == 18 and source.read(5).roi == (4, 4, 28, 28)
    finally:
        storage.delete(url)


# --------------------------------------------------------------------------------------------- real data

needs_real_zip = pytest.mark.skipif(not REAL_ZIP.exists(),
                                    reason=f"real GTSRB data not found at {REAL_ZIP} (see shared/data/README.md)")


@pytest.fixture(scope="module")
def real() -> GtsrbSource:
    source = open_gtsrb_train(str(REAL_ZIP))
    assert isinstance(source, GtsrbSource)
    return source


@needs_real_zip
def test_real_zip_lists_from_its_csvs_with_the_documented_counts(monkeypatch) -> None:
    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def open_and_record(self, name, *args, **kwargs):  # records the member, then the real read
        opened.append(getattr(name, "filename", name))
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", open_and_record)
    source = open_gtsrb_train(str(REAL_ZIP))
    entries = source.entries()
    # listing reads the 43 CSVs (sizes, ROIs, tracks) and decodes no image: it stays fast at any size
    assert opened and all(n.lower().endswith(".csv") for n in opened), [n for n in opened if not n.endswith(".csv")][:3]
    assert all(isinstance(e, Sample) for e in entries) and source.problem_counts() == {}
    assert len(entries) == 39_209
    assert len({e.label for e in entries}) == 43
    assert len({e.track for e in entries}) == 1_307
    counts = np.bincount([e.label for e in entries])
    assert (counts.min(), counts[0], counts.max(), counts[2]) == (210, 210, 2250, 2250)


@needs_real_zip
def test_real_track_split_is_disjoint_and_complete(real: GtsrbSource) -> None:
    train, val = real.split_indices(0.1, seed=0)
    assert len(np.intersect1d(train, val)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(real)))
    tracks = real.table.tracks
    assert not {tracks[i] for i in train} & {tracks[i] for i in val}
    labels = real.table.labels
    assert set(labels[val].tolist()) == set(labels[train].tolist()) == set(range(43))
    assert 0.08 < len(val) / len(real) < 0.12


@needs_real_zip
def test_real_samples_decode_to_32x32_with_rois_inside(real: GtsrbSource) -> None:
    for index in np.linspace(0, len(real) - 1, 25).astype(int):
        sample = real.read(int(index))
        assert isinstance(sample, Sample)
        assert decode(sample.image).shape == (32, 32, 3)
        x1, y1, x2, y2 = sample.roi
        assert 0 <= x1 < x2 <= 32 and 0 <= y1 < y2 <= 32
        assert sample.meta["csv_size"] != (32, 32) or sample.roi == sample.meta["csv_roi"]
