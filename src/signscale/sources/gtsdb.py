"""``gtsdb:`` the German Traffic Sign Detection Benchmark, from its folder or zip.

Layout: ``NNNNN.ppm`` scenes (1360x800) and one ``gt.txt`` beside them with lines
``00000.ppm;x1;y1;x2;y2;ClassId`` (GTSRB class ids, so the ``de`` catalogue). An image may have
several lines or none: a scene without lines is a scene without signs, not an error. GTSDB's
``x2``/``y2`` are the last pixel *inside* the box; scene boxes here end exclusively, so 1 is added.

``split=train`` keeps images 00000-00599 and ``split=test`` 00600-00899, the official protocol; scores
on random splits of GTSDB mix frames of the same road and are inflated. ``split=all`` keeps every image.

Bad input is data, never a crash: malformed lines, class ids outside the catalogue and lines naming
an image that is not there are listed in :attr:`GtsdbSource.problems` with ``gt.txt:LINE``; boxes
outside the image or of zero area are dropped when the image is read and named in the scene's
``meta["problems"]``; an unreadable or oversized image (``max_pixels``) is a :class:`Problem`.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

from signscale import images
from signscale.labels import LabelSpace
from signscale.sources.base import Problem, Sample, Source, SourceError
from signscale.sources.gtsrb import Tree, open_tree
from signscale.sources.scenes import check_box, scene_meta, scene_sample

KIND = "gtsdb"
SPLITS = {"all": (0, 10**9), "train": (0, 600), "test": (600, 900)}
_IMAGE = re.compile(r"^(?P<num>\d+)\.(ppm|png|jpe?g)$", re.IGNORECASE)
_EXPECT = ("the GTSDB layout: a folder or zip with NNNNN.ppm scenes and gt.txt "
           "(lines 00000.ppm;x1;y1;x2;y2;ClassId)")


class GtsdbSource(Source):
    kind = KIND

    def __init__(self, tree: Tree, root: str, names: list[str], boxes: dict[str, list[tuple[int, list[int], int]]],
                 problems: list[Problem], *, spec: str, max_pixels: int) -> None:
        super().__init__(LabelSpace.for_country("de"), spec)
        self.tree, self.root, self.names, self.boxes = tree, root, names, boxes
        self.problems = problems
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.names)

    def read(self, index: int) -> Sample | Problem:
        name = self.names[index]
        try:
            data = self.tree.read(posixpath.join(self.root, name) if self.root else name)
            arr = images.decode(data, max_pixels=self.max_pixels)
        except FileNotFoundError:
            return Problem(name, "missing_file", "listed but not readable", self.spec)
        except images.ImageError as exc:
            return Problem(name, exc.reason, exc.detail, self.spec)
        h, w = arr.shape[:2]
        boxes, labels, problems = [], [], []
        for line, box, cid in self.boxes.get(name, []):
            fixed, why = check_box(box, w, h)
            if why:
                problems.append(f"gt.txt:{line}: {why} ({name} box {box} in a {w}x{h} image)")
            if fixed is not None:
                boxes.append(fixed)
                labels.append(cid)
        meta = scene_meta(boxes, labels, ["de"] * len(labels), w, h, problems)
        return scene_sample(name, arr, meta, source=self.spec)

    def describe(self) -> dict[str, Any]:
        reasons: dict[str, int] = {}
        for p in self.problems:
            reasons[p.reason] = reasons.get(p.reason, 0) + 1
        return {**super().describe(), "boxes": sum(len(v) for v in self.boxes.values()), "problems": reasons}


def parse_gt(text: str, images_present: set[str], space: LabelSpace
             ) -> tuple[dict[str, list[tuple[int, list[int], int]]], list[Problem]]:
    """{image: [(line, [x1, y1, x2 + 1, y2 + 1], class id)]} and the problems, each naming gt.txt:LINE."""
    boxes: dict[str, list[tuple[int, list[int], int]]] = {}
    problems: list[Problem] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"gt.txt:{n}"
        fields = [f.strip() for f in line.split(";")]
        if len(fields) != 6:
            problems.append(Problem(where, "bad_line", f"expected 6 fields separated by ';', got {len(fields)}: "
                                                       f"{line[:80]!r}"))
            continue
        name = fields[0]
        try:
            x1, y1, x2, y2, cid = (int(float(v)) for v in fields[1:])
        except ValueError:
            problems.append(Problem(where, "bad_line", f"non-numeric field in {line[:80]!r}"))
            continue
        if not 0 <= cid < len(space):
            problems.append(Problem(where, "class_not_in_catalogue",
                                    f"ClassId {cid} is outside 0..{len(space) - 1} ({name})"))
            continue
        if x2 <= x1 or y2 <= y1:  # inclusive corners: a sign at least 2 px each way
            problems.append(Problem(where, "box_zero_area", f"({x1},{y1})-({x2},{y2}) in {name}"))
            continue
        if name not in images_present:
            problems.append(Problem(where, "label_without_image", f"{name} is not in the folder/zip"))
            continue
        boxes.setdefault(name, []).append((n, [x1, y1, x2 + 1, y2 + 1], cid))
    return boxes, problems


def open_gtsdb(location: str, *, spec: str = "", split: str = "all", max_pixels: str | int = str(
        images.DEFAULT_MAX_PIXELS)) -> GtsdbSource:
    """``gtsdb:PATH[?split=all|train|test&max_pixels=N]``."""
    if split not in SPLITS:
        raise SourceError(f"{KIND}: split={split!r}; expected one of {', '.join(SPLITS)} "
                          "(train = 00000-00599, test = 00600-00899, the official protocol)")
    try:
        limit = int(max_pixels)
    except ValueError:
        raise SourceError(f"{KIND}: max_pixels={max_pixels!r} is not an integer") from None
    tree = open_tree(location, expected=_EXPECT)
    names = tree.names()
    gts = sorted((n for n in names if posixpath.basename(n).lower() == "gt.txt"), key=lambda n: (n.count("/"), n))
    if not gts:
        raise SourceError(f"{location}: no gt.txt found; expected {_EXPECT}")
    root = posixpath.dirname(gts[0])
    present = {posixpath.basename(n) for n in names
               if posixpath.dirname(n) == root and _IMAGE.match(posixpath.basename(n))}
    space = LabelSpace.for_country("de")
    boxes, problems = parse_gt(tree.read(gts[0]).decode("utf-8-sig", errors="replace"), present, space)
    lo, hi = SPLITS[split]
    kept = sorted(n for n in present if lo <= int(_IMAGE.match(n).group("num")) < hi)  # type: ignore[union-attr]
    boxes = {k: v for k, v in boxes.items() if k in set(kept)}
    if not kept:
        raise SourceError(f"{location}: no scene images (NNNNN.ppm) beside {gts[0]} in split {split!r}")
    return GtsdbSource(tree, root, kept, boxes, problems, spec=spec or f"{KIND}:{location}?split={split}",
                       max_pixels=limit)
