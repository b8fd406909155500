"""Your own labelled images: a folder of class folders, or a CSV / JSONL list of ``path,label``.

Two layouts, chosen by what ``location`` is:

* **a folder** with one sub-folder per class, named by a catalogue key (``keep_right``) or a class id
  (``38`` or ``00038``, the way GTSRB numbers its folders); images may sit in deeper folders, the
  top-level folder decides the label;
* **a list file**: ``*.csv`` with a ``path,label`` header, or ``*.jsonl`` with one
  ``{"path": ..., "label": ...}`` object per line. Paths are relative to the list's folder (absolute
  paths and URLs are taken as they are); labels are keys or ids. Optional columns / fields
  ``condition``, ``track`` and ``country`` describe the sample further.

Labels are checked against the label space of ``country`` when the source is opened, so a typo in a
folder name shows up as a :class:`Problem` naming the file and the label, not as a crash an hour into
packing. Missing files are found from one listing per folder; unreadable images from :meth:`read`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from signscale import storage
from signscale.data.sources.base import CONDITIONS, Problem, Sample, Source, SourceError
from signscale.labels import LabelError, LabelSpace

KIND = "folder"

# Extensions PIL reads that people keep sign crops in; anything else in a class folder (notes,
# Thumbs.db) is skipped and counted rather than turned into an "unreadable image".
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".pnm", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
LIST_EXTENSIONS: dict[str, str] = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}

_EXPECTED = ("a folder with one sub-folder per class (named by key, e.g. keep_right, or id, e.g. 00038), "
             "a .csv list with a `path,label` header, or a .jsonl list of {\"path\": ..., \"label\": ...}")


# ---------------------------------------------------------------------------------------------
# Location helpers (also used by the GTSRB source): everything goes through storage, so s3:// works.

def normalize_location(location: str) -> str:
    """Absolute local path, or the URL without a trailing slash, so listings can be made relative."""
    local = storage.local_path(location)
    if local is not None:
        return os.path.abspath(os.path.expanduser(local)).replace(os.sep, "/")
    return location.rstrip("/")


def is_folder(url: str) -> bool:
    """True for an existing folder (or object-store prefix), False for a file; the caller checks existence.

    storage has no isdir, and reading the first byte tells the two apart on every back-end: a local
    folder raises IsADirectoryError, an object-store prefix has no object to read.
    """
    try:
        storage.read_bytes(url, 0, 1)
    except (IsADirectoryError, FileNotFoundError):
        return True
    return False


def list_tree(root: str) -> list[str]:
    """Relative POSIX paths of everything under ``root`` (files and folders, sorted), in one listing.

    One recursive glob instead of a walk: on object stores it is a few paginated requests rather than
    one per folder. Folders appear too (fsspec's glob does not tell them apart); callers filter by name.
    """
    found = storage.glob(storage.join(root, "**"))
    if any(ch in root for ch in "*?["):
        base = root.rstrip("/")  # a glob of the root itself would expand the brackets
    else:  # fsspec's own spelling of the root (memory:///x for memory://x, absolute local paths)
        base = (storage.glob(root) or [root])[0].rstrip("/")
    prefix = base + "/"
    return sorted(f[len(prefix):] for f in found if f.startswith(prefix) and len(f) > len(prefix))


def is_junk(relpath: str) -> bool:
    """Hidden files and macOS archive litter (``__MACOSX/``, ``._name``), never data."""
    return any(part.startswith(".") or part == "__MACOSX" for part in relpath.split("/"))


def count_reasons(items: Iterable[Sample | Problem]) -> dict[str, int]:
    """Problems by reason: what a summary or a quarantine report shows."""
    return dict(Counter(p.reason for p in items if isinstance(p, Problem)))


def resolve_label(value: Any, space: LabelSpace) -> int:
    """A class id from a key (``keep_right``) or an id (``38``, ``"00038"``); LabelError if neither fits."""
    if isinstance(value, bool):  # bool is an int subclass; True is not class 1
        raise LabelError(f"label {value!r} is neither a class key nor an id")
    if isinstance(value, int):
        return space.check_id(value)
    if isinstance(value, str):
        text = value.strip()
        if text.isdigit():
            return space.check_id(int(text))
        try:
            return space.index(text)
        except LabelError:
            raise LabelError(f"label {value!r} is neither a class key of label space {space.name!r} "
                             f"nor an id 0..{len(space) - 1}") from None
    raise LabelError(f"label {value!r} is neither a class key nor an id")


# ---------------------------------------------------------------------------------------------
# The source

class FolderSource(Source):
    """Samples listed once at open time; :meth:`read` fetches and checks one image."""

    kind = KIND

    def __init__(self, entries: list[Sample | Problem], urls: list[str | None], *, label_space: LabelSpace,
                 spec: str, location: str, layout: str, skipped: int = 0) -> None:
        super().__init__(label_space, spec)
        self._entries = entries
        self._urls = urls  # where to read entry i; None for problems found at listing time
        self.location = location
        self.layout = layout  # "folders" | "csv" | "jsonl"
        self.skipped = skipped  # files ignored because their extension is not an image's

    def __len__(self) -> int:
        return len(self._entries)

    def read(self, index: int) -> Sample | Problem:
        entry = self._entries[_check_index(index, len(self))]
        if isinstance(entry, Problem):
            return entry
        url = self._urls[index]
        assert url is not None
        try:
            data = storage.read_bytes(url)
        except FileNotFoundError:
            return Problem(entry.key, "missing_file", f"{url} does not exist", KIND)
        except IsADirectoryError:  # a folder named like an image (``x.png/``): there, but not an image
            return Problem(entry.key, "not_a_file", f"{url} is a folder, not a file; rename or move it", KIND)
        return replace(entry, image=data)  # decoded (and validated) by whoever uses the pixels

    def entries(self) -> list[Sample | Problem]:
        """All entries without images, from the listing alone (no file is opened)."""
        return list(self._entries)

    def problem_counts(self) -> dict[str, int]:
        """Problems found while listing, by reason (unreadable images only show up in :meth:`read`)."""
        return count_reasons(self._entries)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "location": self.location, "layout": self.layout,
                "problems": self.problem_counts(), "skipped_files": self.skipped}


def _check_index(index: int, n: int) -> int:
    if not 0 <= index < n:
        raise IndexError(f"index {index} is outside 0..{n - 1}")
    return index


# ---------------------------------------------------------------------------------------------
# Layout (a): one sub-folder per class

def _scan_class_folders(root: str, space: LabelSpace, country: str
                        ) -> tuple[list[Sample | Problem], list[str | None], int]:
    entries: list[Sample | Problem] = []
    urls: list[str | None] = []
    skipped = 0
    labels: dict[str, int | LabelError] = {}
    for rel in list_tree(root):
        if is_junk(rel):
            continue
        if posixpath.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
            skipped += "." in posixpath.basename(rel)  # folders have no extension; count files only
            continue
        entry = _class_folder_entry(rel, space, country, labels)
        entries.append(entry)
        urls.append(storage.join(root, rel) if isinstance(entry, Sample) else None)
    return entries, urls, skipped


def _class_folder_entry(rel: str, space: LabelSpace, country: str,
                        labels: dict[str, int | LabelError]) -> Sample | Problem:
    if "/" not in rel:
        return Problem(rel, "no_label", "image at the top level: put it in a folder named after its class", KIND)
    folder = rel.split("/", 1)[0]
    if folder not in labels:  # resolve each folder once, not once per image
        try:
            labels[folder] = resolve_label(folder, space)
        except LabelError as exc:
            labels[folder] = exc
    label = labels[folder]
    if isinstance(label, LabelError):
        return Problem(rel, "unknown_label", f"class folder {folder!r}: {label}", KIND)
    return Sample(key=rel, label=label, source=KIND, country=country)


# ---------------------------------------------------------------------------------------------
# Layout (b): a CSV or JSONL list

def _read_list(url: str, fmt: str) -> list[tuple[int, dict[str, Any] | str]]:
    """(line number, row) pairs; a row that cannot be parsed is an error string instead of a dict."""
    text = storage.read_bytes(url).decode("utf-8-sig", errors="replace")
    return _csv_rows(url, text) if fmt == "csv" else _jsonl_rows(text)


def _csv_rows(url: str, text: str) -> list[tuple[int, dict[str, Any] | str]]:
    reader = csv.reader(io.StringIO(text))
    header = [h.strip().lower() for h in next(reader, [])]
    if "path" not in header or "label" not in header:
        raise SourceError(f"{url}: a CSV list needs a header row with the columns `path,label` "
                          f"(optional: condition, track, country); found {','.join(header) or 'nothing'}")
    rows: list[tuple[int, dict[str, Any] | str]] = []
    for fields in reader:
        line = reader.line_num
        if not any(f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            rows.append((line, f"expected {len(header)} columns ({','.join(header)}), found {len(fields)}"))
            continue
        rows.append((line, {h: f.strip() for h, f in zip(header, fields) if f.strip() != ""}))
    return rows


def _jsonl_rows(text: str) -> list[tuple[int, dict[str, Any] | str]]:
    rows: list[tuple[int, dict[str, Any] | str]] = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            rows.append((line, f"not valid JSON ({exc.msg})"))
            continue
        rows.append((line, obj if isinstance(obj, dict) else f"expected a JSON object, found {type(obj).__name__}"))
    return rows


def _resolve_path(base_dir: str, path: str) -> str:
    """Paths in a list are relative to the list's folder unless they are absolute or URLs."""
    if "://" in path or path.startswith("/"):
        return path
    return storage.join(base_dir, path)


def _scan_list(url: str, fmt: str, space: LabelSpace, country: str
               ) -> tuple[list[Sample | Problem], list[str | None]]:
    name = posixpath.basename(url)
    base_dir = posixpath.dirname(url)
    bad_row = f"bad_{fmt}_row"
    entries: list[Sample | Problem] = []
    urls: list[str | None] = []
    first_line: dict[str, int] = {}
    for line, row in _read_list(url, fmt):
        where = f"{name}:{line}"
        entry = Problem(where, bad_row, f"{where}: {row}", KIND) if isinstance(row, str) else \
            _list_entry(row, where, bad_row, space, country)
        if isinstance(entry, Sample) and entry.key in first_line:
            entry = Problem(where, "duplicate_entry",
                            f"{entry.key} is already listed on line {first_line[entry.key]}", KIND)
        if isinstance(entry, Sample):
            first_line[entry.key] = line
        entries.append(entry)
        urls.append(_resolve_path(base_dir, entry.key) if isinstance(entry, Sample) else None)
    _mark_missing(entries, urls)
    return entries, urls


def _list_entry(row: dict[str, Any], where: str, bad_row: str, space: LabelSpace,
                country: str) -> Sample | Problem:
    path, label = row.get("path"), row.get("label")
    if not isinstance(path, str) or not path.strip() or label is None or label == "":
        return Problem(where, bad_row, f"{where}: needs a non-empty path and label, got {row}", KIND)
    path = path.strip()
    try:
        label_id = resolve_label(label, space)
    except LabelError as exc:
        return Problem(path, "unknown_label", f"{where}: {exc}", KIND)
    condition = str(row.get("condition") or "clear")
    if condition not in CONDITIONS:
        return Problem(path, "bad_condition",
                       f"{where}: condition {condition!r} is not one of {', '.join(CONDITIONS)}", KIND)
    row_country = str(row.get("country") or country)
    if row_country != country:
        return Problem(path, "country_mismatch", f"{where}: row says country {row_country!r} but the source "
                       f"reads labels as {country!r}; open it with ?country={row_country}", KIND)
    track = row.get("track")
    return Sample(key=path, label=label_id, source=KIND, track=None if track in (None, "") else str(track),
                  condition=condition, country=country)


def _mark_missing(entries: list[Sample | Problem], urls: list[str | None]) -> None:
    """Turn entries whose file is absent into ``missing_file`` problems, with one listing per folder."""
    present: dict[str, set[str]] = {}
    for i, url in enumerate(urls):
        if url is None:
            continue
        folder, base = posixpath.split(url)
        if folder not in present:
            present[folder] = _names_in(folder)
        if base not in present[folder]:
            entries[i] = Problem(entries[i].key, "missing_file", f"{url} does not exist", KIND)
            urls[i] = None


def _names_in(folder: str) -> set[str]:
    try:
        return {posixpath.basename(u.rstrip("/")) for u in storage.listdir(folder)}
    except (FileNotFoundError, NotADirectoryError):
        return set()


# ---------------------------------------------------------------------------------------------
# Factory

def open_folder(location: str, *, spec: str = "", country: str = "de") -> FolderSource:
    """Open ``folder:LOCATION[?country=de]``; see the module docstring for the two layouts."""
    try:
        space = LabelSpace.for_country(country)
    except LabelError as exc:
        raise SourceError(f"folder option country={country!r} is not valid: {exc}") from None
    if not location:
        raise SourceError(f"folder: no location given; expected {_EXPECTED}")
    url = normalize_location(location)
    if not storage.exists(url):
        raise SourceError(f"{location}: no such file or folder; expected {_EXPECTED}")
    spec = spec or f"{KIND}:{location}?country={country}"
    fmt = LIST_EXTENSIONS.get(posixpath.splitext(url)[1].lower())
    if fmt is not None and not is_folder(url):
        entries, urls = _scan_list(url, fmt, space, country)
        return FolderSource(entries, urls, label_space=space, spec=spec, location=url, layout=fmt)
    if not is_folder(url):
        raise SourceError(f"{location} is a file but not a .csv or .jsonl list; expected {_EXPECTED}")
    entries, urls, skipped = _scan_class_folders(url, space, country)
    if not entries:
        raise SourceError(f"{location}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                          f"expected {_EXPECTED}")
    return FolderSource(entries, urls, label_space=space, spec=spec, location=url, layout="folders",
                        skipped=skipped)
