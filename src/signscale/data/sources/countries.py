"""Sign crops from other countries: China (``tsrd23:``) and Belgium (``belgiumtsc:``).

* ``tsrd23:`` reads the shared TSRD23 crops, ``TSRD23/{label}_{index}.png`` (23 classes, PNGs of
  varying size). There are no track or pole ids, but indices run through the whole set and runs
  of consecutive indices within a class are views of one physical sign. The split therefore holds
  out *contiguous index blocks* per class: each maximal run of consecutive indices is cut into
  blocks of at most ``block`` images, and whole blocks are held out (the same hash-ranked, per-class
  procedure as GTSRB's tracks). A block boundary can still fall inside one sign's run, so a little
  leakage remains possible at block edges; larger blocks trade that for a coarser split.
  The shared copy also holds many byte-identical files under two indices (e.g. ``0_522.png`` and
  ``0_2210.png``: 3,041 of 4,896 files repeat an earlier one), so blocks that share any identical
  image are joined into one group (:func:`join_duplicates`) before splitting: an exact copy of a
  validation image never sits in training.
* ``belgiumtsc:`` reads BelgiumTSC's official layout, which looks like GTSRB's
  (``000NN/PPPPP_FFFFF.ppm`` + ``GT-000NN.csv``, PPPPP the pole id, used as the track) but whose
  CSVs swap the axes: the ``Width`` column is the image's *height* and ``Roi.X1``/``Roi.X2`` are
  *row* coordinates. :class:`BelgiumSource` swaps them back, so every ROI here is (x1, y1, x2, y2)
  in decoded pixels like everywhere else in signscale.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from typing import Any

import numpy as np

from signscale.data.sources.base import Problem, Sample, Source, SourceError, TreeCrops, one_side
from signscale.data.sources.folder import count_reasons, is_junk
from signscale.data.sources.gtsrb import (
    SPLITS,
    GtsrbSource,
    Tree,
    _choice,
    _fraction,
    _integer,
    open_tree,
    scan_training,
    track_split,
)
from signscale.labels import LabelSpace

KIND_TSRD = "tsrd23"
KIND_BELGIUM = "belgiumtsc"
_TSRD_FILE = re.compile(r"^(?P<label>\d+)_(?P<index>\d+)\.(?:png|jpe?g|ppm|bmp)$", re.IGNORECASE)
_EXPECT_TSRD = "the TSRD23 crops: TSRD23_crops_64px.zip or its folder of {label}_{index}.png files"
_EXPECT_BELGIUM = ("BelgiumTSC in its official layout: BelgiumTSC_Training.zip (or _Testing) or its folder, "
                   "000NN/PPPPP_FFFFF.ppm with a GT-000NN.csv in each class folder")


def index_blocks(labels: np.ndarray, indices: np.ndarray, block: int) -> list[str]:
    """A group id per image: its class, its run of consecutive indices, and its block within the run."""
    order = np.lexsort((indices, labels))
    groups = [""] * len(labels)
    prev_label, prev_index, run, pos = None, None, 0, 0
    for i in order:
        label, index = int(labels[i]), int(indices[i])
        if label != prev_label or index != prev_index + 1:  # type: ignore[operator]
            run, pos = run + 1, 0
        groups[i] = f"{label}/run{run}/block{pos // block}"
        prev_label, prev_index, pos = label, index, pos + 1
    return groups


def join_duplicates(groups: list[str], digests: list[bytes]) -> list[str]:
    """Merge groups that share any identical content (union-find), naming each by its first member."""
    parent: dict[str, str] = {g: g for g in groups}

    def root(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    first: dict[bytes, str] = {}
    for g, d in zip(groups, digests):
        if d in first:
            a, b = root(first[d]), root(g)
            if a != b:
                parent[max(a, b)] = min(a, b)
        else:
            first[d] = g
    return [root(g) for g in groups]


class Tsrd23Source(TreeCrops):
    """The TSRD23 crops; ``track`` is the index block (see the module docstring)."""

    kind = KIND_TSRD

    def __init__(
        self,
        tree: Tree,
        names: list[str],
        labels: np.ndarray,
        groups: list[str],
        problems: dict[int, Problem],
        *,
        spec: str,
        location: str,
    ) -> None:
        super().__init__(LabelSpace.for_country("cn"), spec)
        self.tree, self.names, self.labels, self.groups = tree, names, labels, groups
        self.problems, self.location = problems, location

    def _sample(self, index: int, image: bytes | None = None) -> Sample:
        return Sample(key=posixpath.basename(self.names[index]), label=int(self.labels[index]), image=image,
                      source=self.kind, track=self.groups[index], country="cn")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "location": self.location, "format": self.tree.format,
                "problems": count_reasons(self.problems.values()), "blocks": len(set(self.groups))}


def scan_tsrd(tree: Tree, location: str) -> tuple[list[str], np.ndarray, np.ndarray, dict[int, Problem]]:
    """(names, labels, indices, problems) from the listing alone; names sorted for a stable order."""
    space = LabelSpace.for_country("cn")
    names = sorted(n for n in tree.names() if not is_junk(n) and not n.endswith("/"))
    images = [n for n in names if posixpath.splitext(n)[1].lower() in (".png", ".jpg", ".jpeg", ".ppm", ".bmp")]
    if not images:
        raise SourceError(f"{location} holds no images; expected {_EXPECT_TSRD}")
    labels = np.full(len(images), -1, dtype=np.int64)
    indices = np.zeros(len(images), dtype=np.int64)
    problems: dict[int, Problem] = {}
    for i, name in enumerate(images):
        m = _TSRD_FILE.match(posixpath.basename(name))
        if not m:
            problems[i] = Problem(name, "bad_name", f"{name}: expected LABEL_INDEX.png, e.g. 5_1203.png", KIND_TSRD)
        elif not 0 <= int(m["label"]) < len(space):
            problems[i] = Problem(
                name,
                "label_out_of_range",
                f"{name}: label {m['label']} is outside 0..{len(space) - 1} of the cn catalogue",
                KIND_TSRD,
            )
        else:
            labels[i], indices[i] = int(m["label"]), int(m["index"])
    return images, labels, indices, problems


def open_tsrd23(location: str, *, spec: str = "", split: str = "all", val_fraction: str | float = "0.2",
                seed: str | int = "0", block: str | int = "10") -> Source:
    """``tsrd23:LOCATION[?split=all|train|val&val_fraction=0.2&seed=0&block=10]``: the Chinese crops."""
    split = _choice(KIND_TSRD, "split", split, SPLITS)
    fraction = _fraction(KIND_TSRD, "val_fraction", val_fraction)
    seed_value, block_size = _integer(KIND_TSRD, "seed", seed), _integer(KIND_TSRD, "block", block)
    if block_size < 1:
        raise SourceError(f"{KIND_TSRD} option block={block!r} is not valid: expected an integer >= 1, e.g. block=10")
    tree = open_tree(location, expected=_EXPECT_TSRD)
    names, labels, indices, problems = scan_tsrd(tree, location)
    groups = index_blocks(labels, indices, block_size)
    if split != "all":  # reading 5k small files costs about a second; a leaky split costs the evaluation
        groups = join_duplicates(groups, [hashlib.blake2b(tree.read(n), digest_size=16).digest() for n in names])
    spec = spec or f"{KIND_TSRD}:{location}?split={split}&val_fraction={fraction}&seed={seed_value}&block={block_size}"
    source = Tsrd23Source(tree, names, labels, groups, problems, spec=spec, location=location)
    return one_side(source, split, lambda: track_split(groups, labels, fraction, seed_value))


class BelgiumSource(GtsrbSource):
    """BelgiumTSC: the GTSRB reader with the CSV's swapped axes put right (see the module docstring)."""

    country = "be"


def swap_belgium_axes(boxes: np.ndarray) -> np.ndarray:
    """CSV (Width, Height, Roi.X1, Roi.Y1, Roi.X2, Roi.Y2) as BelgiumTSC writes them -> true (w, h, x1, y1, x2, y2)."""
    out = boxes.copy()
    known = boxes[:, 0] >= 0
    out[known] = boxes[known][:, [1, 0, 3, 2, 5, 4]]
    return out


def open_belgiumtsc(location: str, *, spec: str = "", split: str = "all", val_fraction: str | float = "0.1",
                    seed: str | int = "0") -> Source:
    """``belgiumtsc:LOCATION[?split=all|train|val&val_fraction=0.1&seed=0]``: whole poles held out for val."""
    split = _choice(KIND_BELGIUM, "split", split, SPLITS)
    fraction = _fraction(KIND_BELGIUM, "val_fraction", val_fraction)
    seed_value = _integer(KIND_BELGIUM, "seed", seed)
    space = LabelSpace.for_country("be")
    tree = open_tree(location, expected=_EXPECT_BELGIUM)
    root, table = scan_training(tree, space, location, kind=KIND_BELGIUM)
    table.boxes = swap_belgium_axes(table.boxes)
    spec = spec or f"{KIND_BELGIUM}:{location}?split={split}&val_fraction={fraction}&seed={seed_value}"
    source = BelgiumSource(tree, root, table, kind=KIND_BELGIUM, label_space=space, spec=spec, location=location)
    return one_side(source, split, lambda: source.split_indices(fraction, seed_value))
