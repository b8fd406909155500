"""TT100K sign crops (``tt100k:``): 152 Chinese classes named by code, held out by panorama.

Layout: ``TT100K_train/<code>/<panorama>_<n>.jpg`` (``negative/<panorama>.jpg`` for background), in a zip
or its folder. Each code is looked up in the ``tt100k`` catalogue (:mod:`signscale.tt100k_codes`:
``pl40`` -> ``speed_limit_40``, ``pne`` -> ``no_entry``, ...); ``negative`` is the "not a sign" class of
the ``bg`` catalogue, so the source's label space is ``tt100k`` plus background. Samples carry country
``cn``. A code without a catalogue row, a family code with a value that is not a number, a file name
without a panorama id: a :class:`Problem` naming the file and the code, never a guessed class. A crop
that does not decode shows up when it is read (``read``, hence ``pack``), named the same way.

**The split holds out panoramas with their neighbours.** Crops of one panorama are often signs of
one gantry or both sides of one road, and alike: in the shared copy, two crops of one panorama share
a class 6.7% of the time against 4.3% for crops of any two panoramas. Panoramas whose ids lie close
could be frames of one drive, so panoramas are chained into one group whenever their ids differ by
at most ``neighbours`` (default 10), and whole groups are held out. The data set the band: in the
shared copy (6,705 panoramas, ids 23..98,887) crops of panoramas 1, 2 or 3 ids apart share a class
3.4-4.5% of the time, the same as panoramas 3,000-10,000 ids apart (4.3%), and 20x20 grey thumbnails
of one class are no more alike at small id gaps than at large ones: the ids carry no sign of a drive
sequence, so the band is a guard rather than a correction. 10 is the widest band that keeps groups
small (3,186 groups, the largest 37 crops of 17,127; at 50 the largest holds 393). Groups are held
out per class, ranked by a hash as for GTSRB's tracks (:func:`track_split`), each group stratified by
its rarest class so that classes with few crops still get a held-out panorama where they have two.
There are no byte-identical crops in the shared copy (checked), so no duplicate joining is needed.
"""

from __future__ import annotations

import posixpath
import re
from collections import Counter
from typing import Any

import numpy as np

from signscale import tt100k_codes
from signscale.data.sources.base import Problem, Sample, Source, SourceError, TreeCrops, one_side
from signscale.data.sources.folder import count_reasons, is_junk
from signscale.data.sources.gtsrb import SPLITS, Tree, _choice, _fraction, _integer, open_tree, track_split
from signscale.labels import LabelSpace

KIND = "tt100k"
COUNTRY = "cn"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp")
_FILE = re.compile(r"^(?P<panorama>\d+)(?:_(?P<n>\d+))?\.[A-Za-z]+$")
_EXPECT = ("the TT100K crops: TT100K_crops_train_64px.zip or its folder, TT100K_train/<code>/<panorama>_<n>.jpg "
           "(e.g. TT100K_train/pl40/12345_0.jpg)")


def label_space() -> LabelSpace:
    """The ``tt100k`` catalogue plus "not a sign" (TT100K's ``negative`` crops) as its last class."""
    return LabelSpace.for_country("tt100k").with_background()


def code_labels(codes: list[str], space: LabelSpace) -> list[int | tt100k_codes.CodeError]:
    """Per code, its class id in ``space`` or the CodeError saying why the catalogue cannot place it."""
    lut = space.map_from(LabelSpace.for_country("tt100k"))
    out: list[int | tt100k_codes.CodeError] = []
    for code in codes:
        try:
            out.append(int(space.background_id) if code == tt100k_codes.NEGATIVE  # type: ignore[arg-type]
                       else int(lut[tt100k_codes.lookup(code)]))
        except tt100k_codes.CodeError as exc:
            out.append(exc)
    return out


def panorama_groups(panoramas: np.ndarray, neighbours: int) -> np.ndarray:
    """A group id per crop: panoramas whose ids differ by at most ``neighbours`` are chained into one.

    Chaining (single linkage over sorted ids) guarantees that no two panoramas ``neighbours`` ids
    apart or closer end up in different groups, whatever the split does with the groups. A crop
    without a panorama id (negative entry: a problem) stands alone in a group of its own.
    """
    known = panoramas >= 0
    ids = np.unique(panoramas[known])
    starts = np.concatenate([[True], np.diff(ids) > neighbours]) if len(ids) else np.zeros(0, dtype=bool)
    group_of_id = np.cumsum(starts) - 1
    groups = -1 - np.arange(len(panoramas), dtype=np.int64)
    groups[known] = group_of_id[np.searchsorted(ids, panoramas[known])]
    return groups


def rarest_class(groups: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per crop, the label of the rarest class (fewest crops overall) in its group: the stratum it is split by."""
    size = Counter(labels.tolist())
    best: dict[int, int] = {}
    for g, y in zip(groups.tolist(), labels.tolist()):
        if g not in best or (size[y], y) < (size[best[g]], best[g]):
            best[g] = y
    return np.array([best[g] for g in groups.tolist()], dtype=np.int64)


def panorama_split(panoramas: np.ndarray, labels: np.ndarray, *, val_fraction: float, seed: int,
                   neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx) over the crops; a panorama and its neighbours are never on both sides."""
    groups = panorama_groups(panoramas, neighbours)
    return track_split([f"g{g}" for g in groups.tolist()], rarest_class(groups, labels), val_fraction, seed)


class Tt100kSource(TreeCrops):
    """The TT100K crops; ``track`` is the panorama group, ``meta`` holds the code and the panorama id."""

    kind = KIND

    def __init__(self, tree: Tree, names: list[str], codes: list[str], labels: np.ndarray, panoramas: np.ndarray,
                 groups: np.ndarray, problems: dict[int, Problem], *, spec: str, location: str,
                 space: LabelSpace) -> None:
        super().__init__(space, spec)
        self.tree, self.names, self.codes, self.labels = tree, names, codes, labels
        self.panoramas, self.groups, self.problems, self.location = panoramas, groups, problems, location

    def _what(self, index: int) -> str:
        return f"{self.names[index]} (code {self.codes[index]})"

    def _sample(self, index: int, image: bytes | None = None) -> Sample:
        return Sample(key=self.names[index], label=int(self.labels[index]), image=image, source=self.kind,
                      track=f"panoramas{int(self.groups[index])}", country=COUNTRY,
                      meta={"code": self.codes[index], "panorama": int(self.panoramas[index])})

    def describe(self) -> dict[str, Any]:
        good = [i for i in range(len(self)) if i not in self.problems]
        return {**super().describe(), "location": self.location, "format": self.tree.format,
                "problems": count_reasons(self.problems.values()),
                "panoramas": len(set(self.panoramas[good].tolist())),
                "panorama_groups": len(set(self.groups[good].tolist()))}


def scan(tree: Tree, location: str, space: LabelSpace) -> tuple[list[str], list[str], np.ndarray, np.ndarray,
                                                                 dict[int, Problem]]:
    """(names, codes, labels, panoramas, problems) from the listing alone; names sorted for a stable order.

    An image's code is its parent folder's name; images outside a code folder are problems too.
    """
    names = sorted(n for n in tree.names() if not is_junk(n) and posixpath.splitext(n)[1].lower() in IMAGE_SUFFIXES)
    if not names:
        raise SourceError(f"{location} holds no images; expected {_EXPECT}")
    codes = [posixpath.basename(posixpath.dirname(n)) for n in names]
    labels = np.full(len(names), -1, dtype=np.int64)
    panoramas = np.full(len(names), -1, dtype=np.int64)
    problems: dict[int, Problem] = {}
    for i, (name, code, label) in enumerate(zip(names, codes, code_labels(codes, space))):
        m = _FILE.match(posixpath.basename(name))
        if isinstance(label, tt100k_codes.CodeError):
            problems[i] = Problem(name, label.reason, f"{name}: {label.detail}", KIND)
            continue
        labels[i] = label
        if not m:
            problems[i] = Problem(name, "bad_name", f"{name} (code {code}): expected PANORAMA_N.jpg, e.g. 12345_0.jpg; "
                                  "the panorama id keeps the split honest", KIND)
            continue
        panoramas[i] = int(m["panorama"])
    if len(problems) == len(names):
        raise SourceError(f"{location}: none of its {len(names)} images could be placed (e.g. "
                          f"{next(iter(problems.values()))}); expected {_EXPECT}")
    return names, codes, labels, panoramas, problems


def open_tt100k(location: str, *, spec: str = "", split: str = "all", val_fraction: str | float = "0.2",
                seed: str | int = "0", neighbours: str | int = "10") -> Source:
    """``tt100k:LOCATION[?split=all|train|val&val_fraction=0.2&seed=0&neighbours=10]``: the TT100K crops."""
    split = _choice(KIND, "split", split, SPLITS)
    fraction = _fraction(KIND, "val_fraction", val_fraction)
    seed_value, band = _integer(KIND, "seed", seed), _integer(KIND, "neighbours", neighbours)
    if band < 0:
        raise SourceError(f"{KIND} option neighbours={neighbours!r} is not valid: expected an integer >= 0 "
                          "(0: only one panorama's own crops stay together), e.g. neighbours=10")
    space = label_space()
    tree = open_tree(location, expected=_EXPECT)
    names, codes, labels, panoramas, problems = scan(tree, location, space)
    groups = panorama_groups(panoramas, band)
    spec = spec or f"{KIND}:{location}?split={split}&val_fraction={fraction}&seed={seed_value}&neighbours={band}"
    source = Tt100kSource(tree, names, codes, labels, panoramas, groups, problems, spec=spec, location=location,
                          space=space)
    return one_side(source, split, lambda: panorama_split(panoramas, labels, val_fraction=fraction, seed=seed_value,
                                                          neighbours=band))
