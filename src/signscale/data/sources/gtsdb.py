"""``gtsdb:`` the German Traffic Sign Detection Benchmark, from its folder or zip.

Layout: ``NNNNN.ppm`` scenes (1360x800) and one ``gt.txt`` beside them with lines
``00000.ppm;x1;y1;x2;y2;ClassId`` (GTSRB class ids, so the ``de`` catalogue). An image may have
several lines or none: a scene without lines is a scene without signs, not an error. GTSDB's
``x2``/``y2`` are the last pixel *inside* the box; scene boxes here end exclusively, so 1 is added.

``split=train`` keeps images 00000-00599 and ``split=test`` 00600-00899, the official protocol; scores
on random splits of GTSDB mix frames of the same road and are inflated. ``split=all`` keeps every image.
Validation is held out by **blocks of frame ids**, never at random: consecutive frames of one drive
are near-duplicates. ``val_block=450-599`` (or several: ``400-449,550-599``, inclusive) takes those ids
out of ``split=train`` and makes them ``split=val``, so no frame id is on both sides.

Frames are read as they come: ``.ppm``, ``.png`` or ``.jpg`` names, 1360x800 originals or rescaled
copies (816x480); a frame of any other size is kept and reported (``unexpected_size``), since boxes
are in the frame's own pixels either way.

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
from signscale.data.sources.base import Problem, Sample, Source, SourceError
from signscale.data.sources.gtsrb import Tree, open_tree
from signscale.data.sources.scenes import check_box, scene_meta, scene_sample
from signscale.labels import LabelSpace

KIND = "gtsdb"
SPLITS = {"all": (0, 10**9), "train": (0, 600), "val": (0, 600), "test": (600, 900)}
KNOWN_SIZES = {(1360, 800), (816, 480)}  # the originals and the 0.6 copy
_IMAGE = re.compile(r"^(?P<num>\d+)\.(ppm|png|jpe?g)$", re.IGNORECASE)
_EXPECT = ("the GTSDB layout: a folder or zip with NNNNN.ppm (or .jpg, .png) scenes and gt.txt "
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
        if (w, h) not in KNOWN_SIZES:
            problems.append(f"{name}: unexpected_size {w}x{h} (GTSDB frames are 1360x800 or 816x480); kept, boxes "
                            "are read in its own pixels")
        meta = scene_meta(boxes, labels, ["de"] * len(labels), w, h, problems)
        # the file's own bytes (decoded once above, so a frame that does not decode is a Problem here):
        # `pack-scenes --format original` keeps them as they are; every reader decodes bytes or arrays
        return scene_sample(name, data, meta, source=self.spec)

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


def parse_blocks(text: str) -> list[tuple[int, int]]:
    """``"450-599"`` or ``"400-449,550-599"`` -> inclusive (first, last) frame-id ranges."""
    blocks = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if not m or int(m.group(1)) > int(m.group(2)):
            raise SourceError(f"{KIND}: val_block={text!r}: expected inclusive frame-id ranges FIRST-LAST, e.g. "
                              "val_block=450-599 or val_block=400-449,550-599")
        blocks.append((int(m.group(1)), int(m.group(2))))
    return blocks


def in_split(num: int, split: str, blocks: list[tuple[int, int]]) -> bool:
    """Whether frame id ``num`` belongs to ``split`` given the validation blocks."""
    lo, hi = SPLITS[split]
    held = any(a <= num <= b for a, b in blocks)
    return lo <= num < hi and (held if split == "val" else not held or split in ("all", "test"))


def open_gtsdb(location: str, *, spec: str = "", split: str = "all", val_block: str = "",
               max_pixels: str | int = str(images.DEFAULT_MAX_PIXELS)) -> GtsdbSource:
    """``gtsdb:PATH[?split=all|train|val|test&val_block=450-599&max_pixels=N]``."""
    if split not in SPLITS:
        raise SourceError(f"{KIND}: split={split!r}; expected one of {', '.join(SPLITS)} "
                          "(train = 00000-00599, test = 00600-00899, the official protocol; val = the val_block ids)")
    blocks = parse_blocks(val_block)
    if split == "val" and not blocks:
        raise SourceError(f"{KIND}: split=val needs the frame ids it holds out, e.g. split=val&val_block=450-599 "
                          "(and split=train&val_block=450-599 for the other side)")
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
    kept = sorted(n for n in present if in_split(int(_IMAGE.match(n).group("num")), split, blocks))  # type: ignore
    boxes = {k: v for k, v in boxes.items() if k in set(kept)}
    if not kept:
        raise SourceError(f"{location}: no scene images (NNNNN.ppm/.jpg) beside {gts[0]} in split {split!r}"
                          f"{f' with val_block={val_block}' if blocks else ''}")
    block = f"&val_block={val_block}" if blocks else ""
    return GtsdbSource(tree, root, kept, boxes, problems, spec=spec or f"{KIND}:{location}?split={split}{block}",
                       max_pixels=limit)
