"""GTSRB in its official layouts, read from the extracted folder or straight from the zip.

* Training (``gtsrb:``): ``.../Final_Training/Images/000NN/TTTTT_FFFFF.ppm`` with one
  ``GT-000NN.csv`` per class folder. ``TTTTT`` is the track: the ~30 frames of one physical sign,
  near-duplicates of each other. That is why the validation split here holds out whole tracks
  (:func:`track_split`); a random split would leak frames and inflate validation accuracy.
* Test (``gtsrb-test:``): flat ``.../Final_Test/Images/NNNNN.ppm`` and ``GT-final_test.csv`` beside
  or above the images, or given with ``?gt=PATH`` (a CSV, or the official ``GTSRB_Final_Test_GT.zip``).
  The official images zip only carries ``GT-final_test.test.csv``, which has no ``ClassId``.

The CSV columns ``Width;Height;Roi.*`` describe the ORIGINAL image. Copies of GTSRB are often rescaled
(the shared copy is all 32x32), so :meth:`GtsrbSource.read` scales the ROI by
``decoded size / CSV size`` and keeps the CSV values in ``meta``. :meth:`GtsrbSource.entries` is built
from the CSVs and the archive's listing alone, without opening an image, so its samples carry
``roi=None`` (the decoded size is unknown there) and ``meta["csv_roi"]``, ``meta["csv_size"]``.

Zips are read in place through :mod:`signscale.storage` (local paths and object stores alike): the
archive is opened lazily once per process and kept open; pickling drops the handle, so a source can be
sent to worker processes and reopens there.
"""

from __future__ import annotations

import hashlib
import math
import os
import posixpath
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from signscale import storage
from signscale.data.sources.base import Problem, Sample, Source, SourceError, one_side
from signscale.data.sources.folder import count_reasons, is_folder, is_junk, list_tree, normalize_location
from signscale.images import ImageError, image_size
from signscale.labels import LabelError, LabelSpace

KIND_TRAIN = "gtsrb"
KIND_TEST = "gtsrb-test"
COUNTRY = "de"
COLUMNS: tuple[str, ...] = ("Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")
SPLITS: tuple[str, ...] = ("all", "train", "val")
STRATIFY: tuple[str, ...] = ("class", "size")  # how held-out tracks are chosen: see track_split, sized_track_split

_TRAIN_CSV = re.compile(r"^(?P<root>(?:.*/)?)(?P<cls>\d{5})/GT-(?P=cls)\.csv$", re.IGNORECASE)
_TRAIN_IMAGE = re.compile(r"^(?P<cls>\d{5})/(?P<file>[^/]+\.ppm)$", re.IGNORECASE)  # below the root
_CLASS_CSV = re.compile(r"^(?P<cls>\d{5})/GT-(?P=cls)\.csv$", re.IGNORECASE)  # below the root
_TRACK_FRAME = re.compile(r"^(?P<track>\d+)_(?P<frame>\d+)\.ppm$", re.IGNORECASE)
_TEST_CSV = "gt-final_test.csv"
_TEST_CSV_WITHOUT_LABELS = "gt-final_test.test.csv"

_EXPECT_TRAIN = ("the GTSRB training set: GTSRB_Final_Training_Images.zip or the folder it extracts to "
                 "(GTSRB/Final_Training/Images/000NN/TTTTT_FFFFF.ppm with a GT-000NN.csv in each class folder)")
_EXPECT_TEST = ("the GTSRB test set: GTSRB_Final_Test_Images.zip or its folder (GTSRB/Final_Test/Images/NNNNN.ppm) "
                "with GT-final_test.csv beside or above the images, or given as ?gt=PATH")


# ---------------------------------------------------------------------------------------------
# A folder or a zip behind one interface: relative names in, bytes out.

class FolderTree:
    """Files under a folder (local or object store)."""

    format = "folder"

    def __init__(self, root: str) -> None:
        self.root = root

    def names(self) -> list[str]:
        return list_tree(self.root)

    def read(self, name: str) -> bytes:
        return storage.read_bytes(storage.join(self.root, name))


class ZipTree:
    """Members of a zip read in place: no extraction step, no second copy of the data set on disk.

    The archive is opened on first use in each process and kept open (parsing the central directory
    of 39k members costs ~0.2 s, far too much per read). A handle inherited through ``fork`` shares its
    file offset with the parent, so a different pid reopens; pickling drops the handle altogether.
    """

    format = "zip"

    def __init__(self, url: str) -> None:
        self.url = url
        self._zip: zipfile.ZipFile | None = None
        self._file: Any = None
        self._pid: int | None = None

    def _archive(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            fh = storage.open_read(self.url)
            try:
                archive = zipfile.ZipFile(fh)
            except BaseException:
                fh.close()
                raise
            self._file, self._zip, self._pid = fh, archive, os.getpid()
        return self._zip

    def names(self) -> list[str]:
        return [info.filename for info in self._archive().infolist() if not info.is_dir()]

    def read(self, name: str) -> bytes:
        try:
            return self._archive().read(name)
        except KeyError:
            raise FileNotFoundError(f"{self.url}: no member {name}") from None

    def close(self) -> None:
        if self._zip is not None and self._pid == os.getpid():
            self._zip.close()
            self._file.close()
        self._zip = self._file = self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self.url}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"])  # type: ignore[misc]


Tree = FolderTree | ZipTree


def open_tree(location: str, *, expected: str) -> Tree:
    """A folder or a zip at ``location``; SourceError (saying what was expected) for anything else."""
    if not location:
        raise SourceError(f"no location given; expected {expected}")
    url = normalize_location(location)
    if not storage.exists(url):
        raise SourceError(f"{location}: no such file or folder; expected {expected}")
    if is_folder(url):
        return FolderTree(url)
    if storage.read_bytes(url, 0, 2) != b"PK":
        raise SourceError(f"{location} is neither a zip archive nor a folder; expected {expected}")
    tree = ZipTree(url)
    try:
        tree.names()
    except (zipfile.BadZipFile, EOFError) as exc:
        raise SourceError(f"{location}: the zip archive is damaged ({exc}); download it again. "
                          f"Expected {expected}") from None
    return tree


# ---------------------------------------------------------------------------------------------
# The GT CSV files

class GtRow(NamedTuple):
    filename: str
    width: int
    height: int
    x1: int
    y1: int
    x2: int
    y2: int
    class_id: int


class CsvHeaderError(ValueError):
    """A GT CSV whose header lacks required columns (e.g. GT-final_test.test.csv has no ClassId)."""


def parse_gt_csv(data: bytes) -> list[tuple[int, GtRow | str]]:
    """(line number, row) for each data line; a malformed line gives a message instead of a row.

    Columns are found by header name, not position, so a reordered export still reads.
    """
    lines = data.decode("utf-8-sig", errors="replace").splitlines()
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise CsvHeaderError("the file is empty")
    header = [c.strip().lower() for c in numbered[0][1].split(";")]
    while header and header[-1] == "":
        header.pop()
    missing = [c for c in COLUMNS if c.lower() not in header]
    if missing:
        raise CsvHeaderError(f"the header lacks {', '.join(missing)} (expected {';'.join(COLUMNS)})")
    where = [header.index(c.lower()) for c in COLUMNS]
    return [(n, _parse_gt_line(line, where, len(header))) for n, line in numbered[1:]]


def _parse_gt_line(line: str, where: list[int], ncols: int) -> GtRow | str:
    fields = line.split(";")
    if len(fields) == ncols + 1 and not fields[-1].strip():  # tolerate a trailing separator
        fields.pop()
    if len(fields) != ncols:
        return f"expected {ncols} fields separated by ';', found {len(fields)}"
    name = fields[where[0]].strip()
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        return f"Filename {name!r} is not a plain file name"
    try:
        w, h, x1, y1, x2, y2, cid = (int(fields[i]) for i in where[1:])
    except ValueError:
        return f"non-integer value in {';'.join(fields[i].strip() for i in where[1:])}"
    if w <= 0 or h <= 0:
        return f"image size {w}x{h} is not positive"
    if not (0 <= x1 < x2 and 0 <= y1 < y2):
        return f"ROI ({x1},{y1},{x2},{y2}) is empty or negative"
    return GtRow(name, w, h, x1, y1, x2, y2, cid)


def scale_roi(roi: Sequence[int], csv_size: Sequence[int], decoded_size: Sequence[int]) -> tuple[int, int, int, int]:
    """The CSV's ROI in decoded-image pixels: scaled by decoded/(CSV size), rounded, kept inside the image.

    GTSRB's ROI is a box with an exclusive end (the official 5-pixel border is 5 pixels on both sides),
    so it scales like coordinates, with no +1. The result is never empty.
    """
    (x1, y1, x2, y2), (cw, ch), (dw, dh) = roi, csv_size, decoded_size

    def at(v: int, scale: float, limit: int) -> int:
        return min(limit, max(0, math.floor(v * scale + 0.5)))

    a, b = _nonempty(at(x1, dw / cw, dw), at(x2, dw / cw, dw), dw)
    c, d = _nonempty(at(y1, dh / ch, dh), at(y2, dh / ch, dh), dh)
    return a, c, b, d


def _nonempty(lo: int, hi: int, limit: int) -> tuple[int, int]:
    if hi > lo:
        return lo, hi
    return (lo, lo + 1) if lo < limit else (limit - 1, limit)


# ---------------------------------------------------------------------------------------------
# Entries as columns: a source is pickled to every worker, and 39k Sample objects are not cheap to send.

class _Row(NamedTuple):
    key: str
    label: int  # -1 where unknown
    stratum: int  # groups the split: class folder (training) or ClassId (test); -1 where unknown
    track: str | None
    box: tuple[int, int, int, int, int, int]  # CSV width, height, x1, y1, x2, y2; -1 where unknown
    problem: Problem | None


_NO_BOX = (-1, -1, -1, -1, -1, -1)


@dataclass
class Table:
    keys: list[str]
    labels: np.ndarray
    strata: np.ndarray
    tracks: list[str | None]
    boxes: np.ndarray  # (N, 6) int32
    problems: dict[int, Problem]

    @classmethod
    def from_rows(cls, rows: list[_Row]) -> Table:
        """Sorted by key so that index ``i`` means the same entry on every machine and every run."""
        rows = sorted(rows, key=lambda r: r.key)
        return cls(keys=[r.key for r in rows],
                   labels=np.array([r.label for r in rows], dtype=np.int64),
                   strata=np.array([r.stratum for r in rows], dtype=np.int64),
                   tracks=[r.track for r in rows],
                   boxes=np.array([r.box for r in rows], dtype=np.int32).reshape(len(rows), 6),
                   problems={i: r.problem for i, r in enumerate(rows) if r.problem is not None})


def _rows_from_csv(parsed: list[tuple[int, GtRow | str]], csv_name: str, *, images: set[str], key_prefix: str,
                   kind: str, space: LabelSpace, track_of: Callable[[str], str | None], folder_class: int | None
                   ) -> tuple[list[_Row], set[str]]:
    """Rows for one parsed GT CSV, and the image names it labels (the rest of ``images`` have no label)."""
    rows: list[_Row] = []
    first: dict[str, int] = {}
    for line, row in parsed:
        if isinstance(row, str) or row.filename in first:
            key = f"{key_prefix}{posixpath.basename(csv_name)}:{line}"
            why = (
                row if isinstance(row, str) else f"{row.filename} is listed again (first on line {first[row.filename]})"
            )
            rows.append(_problem_row(key, Problem(key, "bad_csv_row", f"{csv_name} line {line}: {why}", kind),
                                     folder_class))
            continue
        first[row.filename] = line
        key = key_prefix + row.filename
        problem = _row_problem(row, key, f"{csv_name} line {line}", images, space, kind, folder_class)
        stratum = folder_class if folder_class is not None else row.class_id
        rows.append(_Row(key, row.class_id, stratum, track_of(row.filename), tuple(row[1:7]), problem))
    return rows, set(first)


def _row_problem(row: GtRow, key: str, where: str, images: set[str], space: LabelSpace, kind: str,
                 folder_class: int | None) -> Problem | None:
    if row.filename not in images:
        return Problem(key, "missing_file", f"{where} names {row.filename}, which is not there", kind)
    try:
        space.check_id(row.class_id, where)
    except LabelError as exc:
        return Problem(key, "label_out_of_range", str(exc), kind)
    if folder_class is not None and row.class_id != folder_class:
        # The folder is GTSRB's own statement of the class; disagreeing files were edited or mixed up.
        return Problem(key, "label_mismatch", f"{where}: ClassId {row.class_id} in class folder "
                       f"{folder_class:05d}", kind)
    return None


def _problem_row(key: str, problem: Problem, stratum: int | None, track: str | None = None) -> _Row:
    return _Row(key, -1, -1 if stratum is None else stratum, track, _NO_BOX, problem)


def _unlabelled_rows(names: set[str], key_prefix: str, csv_name: str, kind: str, stratum: int | None,
                     track_of: Callable[[str], str | None]) -> list[_Row]:
    return [_problem_row(key_prefix + n, Problem(key_prefix + n, "no_label", f"no row in {csv_name}", kind),
                         stratum, track_of(n)) for n in sorted(names)]


# ---------------------------------------------------------------------------------------------
# Finding the layouts (the prefix inside a zip or folder varies: GTSRB/..., Final_Training/..., none)

def find_training_root(names: Sequence[str], location: str) -> str:
    """The folder (prefix ending in '/', or '') that holds the 000NN class folders with GT CSVs."""
    roots = sorted({m["root"] for n in names if (m := _TRAIN_CSV.match(n))})
    if len(roots) > 1:
        official = [r for r in roots if r.lower().endswith("final_training/images/")]
        roots = official if len(official) == 1 else roots
    if len(roots) == 1:
        return roots[0]
    if roots:
        raise SourceError(f"{location}: GT-000NN.csv class folders under several folders "
                          f"({', '.join(r or '.' for r in roots)}); point at one of them")
    hint = (" It looks like the test layout: open it with gtsrb-test:." if
            any(posixpath.basename(n).lower() in (_TEST_CSV, _TEST_CSV_WITHOUT_LABELS) for n in names) else "")
    raise SourceError(f"{location} holds no GTSRB training layout (no 000NN/GT-000NN.csv found); "
                      f"expected {_EXPECT_TRAIN}.{hint}")


def _training_track(class_folder: str) -> Callable[[str], str | None]:
    def track_of(filename: str) -> str | None:
        m = _TRACK_FRAME.match(filename)
        return f"{class_folder}/{int(m['track']):05d}" if m else None  # unnamed frames stand alone
    return track_of


def scan_training(tree: Tree, space: LabelSpace, location: str, kind: str = KIND_TRAIN) -> tuple[str, Table]:
    """(root prefix, entries) from the listing and the 43 small CSVs; no image is opened."""
    names = [n for n in tree.names() if not is_junk(n)]
    root = find_training_root(names, location)
    csvs: dict[str, str] = {}
    images: dict[str, set[str]] = {}
    for name in names:
        if not name.startswith(root):
            continue
        rel = name[len(root):]
        if m := _TRAIN_IMAGE.match(rel):
            images.setdefault(m["cls"], set()).add(m["file"])
        elif m := _CLASS_CSV.match(rel):
            csvs[m["cls"]] = name
    rows: list[_Row] = []
    for cls in sorted(set(csvs) | set(images)):
        rows.extend(_class_rows(tree, cls, csvs.get(cls), images.get(cls, set()), root, space, kind))
    return root, Table.from_rows(rows)


def _class_rows(tree: Tree, cls: str, csv_name: str | None, images: set[str], root: str,
                space: LabelSpace, kind: str = KIND_TRAIN) -> list[_Row]:
    track_of = _training_track(cls)
    labelled: set[str] = set()
    rows: list[_Row] = []
    if csv_name is not None:
        try:
            parsed = parse_gt_csv(tree.read(csv_name))
        except CsvHeaderError as exc:  # one class unusable is a problem to report, not a reason to stop
            key = f"{cls}/{posixpath.basename(csv_name)}:1"
            rows = [_problem_row(key, Problem(key, "bad_csv_row", f"{csv_name} line 1: {exc}", kind),
                                 int(cls))]
        else:
            rows, labelled = _rows_from_csv(parsed, csv_name, images=images, key_prefix=f"{cls}/",
                                            kind=kind, space=space, track_of=track_of,
                                            folder_class=int(cls))
    where = csv_name or f"{root}{cls}/GT-{cls}.csv (missing)"
    return rows + _unlabelled_rows(images - labelled, f"{cls}/", where, kind, int(cls), track_of)


def find_test_images(names: Sequence[str], location: str) -> str:
    """The folder (prefix ending in '/', or '') holding the flat NNNNN.ppm test images."""
    dirs = sorted({posixpath.dirname(n) for n in names if n.lower().endswith(".ppm")})
    official = [d for d in dirs if d.lower().endswith("final_test/images")]
    if len(official) == 1:
        return official[0] + "/"
    if any(_TRAIN_CSV.match(n) for n in names):
        raise SourceError(f"{location} is the GTSRB training layout (000NN/GT-000NN.csv); open it with gtsrb:, "
                          f"or give {_EXPECT_TEST}")
    if len(dirs) == 1:
        return dirs[0] + "/" if dirs[0] else ""
    found = f"PPM images in {len(dirs)} folders" if dirs else "no PPM images"
    raise SourceError(f"{location} holds no GTSRB test layout ({found}); expected {_EXPECT_TEST}")


def _find_test_csv(names: Sequence[str], images_dir: str, location: str) -> str:
    """The GT-final_test.csv closest above the images (the same folder counts)."""
    above = [n for n in names if posixpath.basename(n).lower() == _TEST_CSV
             and images_dir.startswith(posixpath.dirname(n) + "/" if posixpath.dirname(n) else "")]
    if above:
        return max(above, key=len)
    if any(posixpath.basename(n).lower() == _TEST_CSV_WITHOUT_LABELS for n in names):
        raise SourceError(f"{location} has only GT-final_test.test.csv, which has no ClassId column: download "
                          f"GTSRB_Final_Test_GT.zip and pass it as ?gt=PATH (the zip or the GT-final_test.csv in it)")
    raise SourceError(f"{location}: no GT-final_test.csv beside or above {images_dir or 'the images'}; "
                      f"pass the labels as ?gt=PATH (GT-final_test.csv or GTSRB_Final_Test_GT.zip)")


def read_gt_option(gt: str) -> tuple[bytes, str]:
    """(CSV bytes, where) for ``?gt=``: a CSV file, or a zip holding GT-final_test.csv."""
    url = normalize_location(gt)
    if not storage.exists(url) or is_folder(url):
        raise SourceError(f"gtsrb-test option gt={gt!r}: no such file; expected GT-final_test.csv "
                          f"or GTSRB_Final_Test_GT.zip")
    if storage.read_bytes(url, 0, 2) != b"PK":
        return storage.read_bytes(url), url
    archive = ZipTree(url)
    try:
        members = [n for n in archive.names() if posixpath.basename(n).lower() == _TEST_CSV]
        if not members:
            raise SourceError(f"gtsrb-test option gt={gt!r}: the zip holds no GT-final_test.csv")
        return archive.read(members[0]), f"{url}!{members[0]}"
    except zipfile.BadZipFile as exc:
        raise SourceError(f"gtsrb-test option gt={gt!r}: the zip archive is damaged ({exc})") from None
    finally:
        archive.close()


def _no_track(filename: str) -> None:
    """Test images are single frames with no track id."""


def scan_test(tree: Tree, space: LabelSpace, location: str, gt: str | None) -> tuple[str, Table]:
    """(images prefix, entries) from the listing and GT-final_test.csv; no image is opened."""
    names = [n for n in tree.names() if not is_junk(n)]
    images_dir = find_test_images(names, location)
    images = {n[len(images_dir):] for n in names if n.startswith(images_dir) and n.lower().endswith(".ppm")
              and "/" not in n[len(images_dir):]}
    if gt:
        data, csv_name = read_gt_option(gt)
    else:
        csv_name = _find_test_csv(names, images_dir, location)
        data = tree.read(csv_name)
    try:
        parsed = parse_gt_csv(data)
    except CsvHeaderError as exc:  # without labels there is no test set to speak of
        raise SourceError(f"{csv_name}: {exc}; expected {_EXPECT_TEST}") from None
    rows, labelled = _rows_from_csv(parsed, csv_name, images=images, key_prefix="", kind=KIND_TEST, space=space,
                                    track_of=_no_track, folder_class=None)
    rows += _unlabelled_rows(images - labelled, "", csv_name, KIND_TEST, None, _no_track)
    return images_dir, Table.from_rows(rows)


# ---------------------------------------------------------------------------------------------
# The source

class GtsrbSource(Source):
    """Either GTSRB layout; entries come from the CSVs, pixels from :meth:`read`."""

    country = COUNTRY

    def __init__(self, tree: Tree, prefix: str, table: Table, *, kind: str, label_space: LabelSpace,
                 spec: str, location: str) -> None:
        super().__init__(label_space, spec)
        self.kind = kind
        self.tree = tree
        self.prefix = prefix  # where the layout starts inside the folder or zip
        self.table = table
        self.location = location

    def __len__(self) -> int:
        return len(self.table.keys)

    def read(self, index: int) -> Sample | Problem:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is outside 0..{len(self) - 1}")
        if index in self.table.problems:
            return self.table.problems[index]
        key = self.table.keys[index]
        try:
            data = self.tree.read(self.prefix + key)
        except (FileNotFoundError, IsADirectoryError):
            return Problem(key, "missing_file", f"{self.prefix}{key} is gone from {self.location}", self.kind)
        try:
            width, height = image_size(data)  # the header is enough to scale the ROI; pack decodes fully
        except ImageError as exc:
            return Problem(key, exc.reason, f"{self.prefix}{key}: {exc.detail}", self.kind)
        w, h, *roi = self.table.boxes[index].tolist()
        return self._sample(index, image=data, roi=scale_roi(roi, (w, h), (width, height)))

    def _sample(self, index: int, *, image: bytes | None = None,
                roi: tuple[int, int, int, int] | None = None) -> Sample:
        w, h, x1, y1, x2, y2 = self.table.boxes[index].tolist()
        return Sample(key=self.table.keys[index], label=int(self.table.labels[index]), image=image,
                      source=self.kind, track=self.table.tracks[index], roi=roi, condition="clear",
                      country=self.country, meta={"csv_size": (w, h), "csv_roi": (x1, y1, x2, y2)})

    def entries(self) -> list[Sample | Problem]:
        """All entries from the CSVs alone: ``roi`` is None (see the module docstring), meta has the CSV box."""
        problems = self.table.problems
        return [problems[i] if i in problems else self._sample(i) for i in range(len(self))]

    def split_indices(self, val_fraction: float, seed: int, stratify: str = "class") -> tuple[np.ndarray, np.ndarray]:
        """(train, val) indices holding out whole tracks per class (``stratify="size"``: across each class's
        range of sign sizes too, see :func:`sized_track_split`); problems follow their track."""
        if stratify == "size":
            return sized_track_split(self.table.tracks, self.table.strata, sign_sizes(self.table.boxes),
                                     val_fraction, seed)
        return track_split(self.table.tracks, self.table.strata, val_fraction, seed)

    def problem_counts(self) -> dict[str, int]:
        """Problems found from the listing and CSVs (unreadable images only show up in :meth:`read`)."""
        return count_reasons(self.table.problems.values())

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "location": self.location, "format": self.tree.format,
                "problems": self.problem_counts(),
                "tracks": len({t for t in self.table.tracks if t is not None})}


# ---------------------------------------------------------------------------------------------
# Track-aware split

def track_split(tracks: Sequence[str | None], labels: Sequence[int] | np.ndarray, val_fraction: float,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): whole tracks held out, stratified by label, deterministic by ``seed``.

    Frames of one track are near-duplicates, so a track is never on both sides. Within each label,
    tracks are ranked by a hash of (seed, track id) and taken until about ``val_fraction`` of that
    label's samples are held out: at least one track where the label has two or more, never all of
    them. Hash ranks (rather than a shuffled order) keep a track's side stable when other tracks are
    added or the input is reordered. Entries without a track (None or "") stand alone; a track whose
    entries disagree on the label is placed by its first entry's label.
    """
    if len(tracks) != len(labels):
        raise ValueError(f"track_split: {len(tracks)} tracks but {len(labels)} labels")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"track_split: val_fraction must be in [0, 1), got {val_fraction}")
    groups: dict[str, list[int]] = {}
    for i, track in enumerate(tracks):
        groups.setdefault(track if track else f"\0untracked/{i}", []).append(i)
    by_label: dict[int, list[str]] = {}
    for name, members in groups.items():
        by_label.setdefault(int(labels[members[0]]), []).append(name)
    val: list[int] = []
    for label in sorted(by_label):
        ranked = sorted(by_label[label], key=lambda name: (_rank(seed, name), name))
        for name in _held_out(ranked, [len(groups[n]) for n in ranked], val_fraction):
            val.extend(groups[name])
    val_idx = np.array(sorted(val), dtype=np.int64)
    train_mask = np.ones(len(tracks), dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask).astype(np.int64), val_idx


def sign_sizes(boxes: np.ndarray) -> np.ndarray:
    """The shorter side of each image in the CSV's original pixels (-1 where unknown): the sign's size on camera."""
    return np.where(boxes[:, 0] >= 0, np.minimum(boxes[:, 0], boxes[:, 1]), -1)


def sized_track_split(tracks: Sequence[str | None], labels: Sequence[int] | np.ndarray, sizes: np.ndarray,
                      val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): whole tracks held out per label, spread evenly over the label's sizes.

    Within each label, tracks are ordered by their median image size and cut into about
    ``val_fraction x tracks`` consecutive bins (at least one where the label has two or more
    tracks); the hash-first track of each bin is held out (:func:`track_split`'s ranks). Small,
    far-away signs are where models err, and with ~130 held-out tracks the plain split's share of
    them moves with the seed (GTSRB: 8.3-11.3% under 30 px over 40 seeds, 9.5% in all; here
    8.4-10.6%, docs/training.md); here every size range of every class sends its share.
    Tracks are whole on one side, as in :func:`track_split`; entries without a track stand alone.
    """
    if not len(tracks) == len(labels) == len(sizes):
        raise ValueError(f"sized_track_split: {len(tracks)} tracks, {len(labels)} labels, {len(sizes)} sizes")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"sized_track_split: val_fraction must be in [0, 1), got {val_fraction}")
    groups: dict[str, list[int]] = {}
    for i, track in enumerate(tracks):
        groups.setdefault(track if track else f"\0untracked/{i}", []).append(i)
    by_label: dict[int, list[tuple[float, str]]] = {}
    for name, members in groups.items():
        known = [int(sizes[i]) for i in members if sizes[i] >= 0]
        by_label.setdefault(int(labels[members[0]]), []).append((float(np.median(known)) if known else -1.0, name))
    val: list[int] = []
    for label in sorted(by_label):
        ordered = [name for _, name in sorted(by_label[label])]
        n = len(ordered)
        if val_fraction <= 0 or n < 2:
            continue
        bins = min(n - 1, max(1, round(n * val_fraction)))
        for b in range(bins):
            part = ordered[round(b * n / bins):round((b + 1) * n / bins)]
            val.extend(groups[min(part, key=lambda name: (_rank(seed, name), name))])
    val_idx = np.array(sorted(val), dtype=np.int64)
    train_mask = np.ones(len(tracks), dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask).astype(np.int64), val_idx


def _rank(seed: int, name: str) -> bytes:
    return hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()


def _held_out(ranked: list[str], sizes: list[int], val_fraction: float) -> list[str]:
    """Groups from the front of ``ranked`` whose sizes sum closest to the target, leaving one for training."""
    if val_fraction <= 0 or len(ranked) < 2:
        return []
    target = val_fraction * sum(sizes)
    taken, chosen = 0, []
    for name, size in zip(ranked[:-1], sizes[:-1]):
        if chosen and abs(taken + size - target) >= abs(taken - target):
            break
        chosen.append(name)
        taken += size
    return chosen


# ---------------------------------------------------------------------------------------------
# Factories (options arrive as strings from the spec's query string)

def _choice(kind: str, name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise SourceError(f"{kind} option {name}={value!r} is not valid: expected one of {', '.join(choices)}")
    return value


def _fraction(kind: str, name: str, value: str | float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not 0.0 < number < 1.0:
        raise SourceError(f"{kind} option {name}={value!r} is not valid: expected a number between 0 and 1, "
                          f"e.g. {name}=0.1")
    return number


def _integer(kind: str, name: str, value: str | int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SourceError(f"{kind} option {name}={value!r} is not valid: expected an integer, e.g. {name}=0") from None


def open_gtsrb_train(location: str, *, spec: str = "", split: str = "all", val_fraction: str | float = "0.1",
                     seed: str | int = "0", stratify: str = "class") -> Source:
    """``gtsrb:LOCATION[?split=all|train|val&val_fraction=0.1&seed=0&stratify=class|size]``: the training set,
    or one side of it (``stratify=size``: held-out tracks spread over each class's sign sizes)."""
    split = _choice(KIND_TRAIN, "split", split, SPLITS)
    fraction = _fraction(KIND_TRAIN, "val_fraction", val_fraction)
    seed_value = _integer(KIND_TRAIN, "seed", seed)
    stratify = _choice(KIND_TRAIN, "stratify", stratify, STRATIFY)
    space = LabelSpace.for_country(COUNTRY)
    tree = open_tree(location, expected=_EXPECT_TRAIN)
    root, table = scan_training(tree, space, location)
    spec = spec or (f"{KIND_TRAIN}:{location}?split={split}&val_fraction={fraction}&seed={seed_value}"
                    + (f"&stratify={stratify}" if stratify != "class" else ""))
    source = GtsrbSource(tree, root, table, kind=KIND_TRAIN, label_space=space, spec=spec, location=location)
    return one_side(source, split, lambda: source.split_indices(fraction, seed_value, stratify))


def open_gtsrb_test(location: str, *, spec: str = "", gt: str | None = None) -> GtsrbSource:
    """``gtsrb-test:LOCATION[?gt=PATH]``: the official test set with its labels."""
    space = LabelSpace.for_country(COUNTRY)
    tree = open_tree(location, expected=_EXPECT_TEST)
    prefix, table = scan_test(tree, space, location, gt or None)
    spec = spec or f"{KIND_TEST}:{location}" + (f"?gt={gt}" if gt else "")
    return GtsrbSource(tree, prefix, table, kind=KIND_TEST, label_space=space, spec=spec, location=location)
