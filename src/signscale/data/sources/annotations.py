"""``yolo:`` and ``coco:`` scene sources: the formats labelling tools export.

**YOLO** (``yolo:DIR[?split=train]``): ``DIR/images/[split/]NAME.jpg`` with
``DIR/labels/[split/]NAME.txt`` holding lines ``class cx cy w h`` (box centre and size normalised to
the image), and the class names in ``data.yaml`` (``names:`` list or mapping), ``classes.txt``,
``names.txt`` or ``obj.names`` (one per line).

**COCO** (``coco:FILE.json[?images=DIR]``): ``images`` (``id``, ``file_name``), ``annotations``
(``image_id``, ``bbox`` = [x, y, width, height] in pixels, ``category_id``) and ``categories``
(``id``, ``name``); image files are looked up under ``images`` (default: the JSON's folder, then its
``images/`` sub-folder).

Class names are matched to the sign catalogue (``country``, default ``de``) by key
(``speed_limit_50``), full name (``Speed limit (50km/h)``) or the country's class id (``2``), case-
and punctuation-insensitively. Bad input is counted and named, never a crash: a class that is not in
the catalogue, a box outside the image or of zero area, an image without a label file (kept as a
scene without signs, reported) or a label file / annotation without its image, a malformed line
(``labels/x.txt:3``), an oversized image (``max_pixels``).
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Sequence
from typing import Any

from signscale import images, storage
from signscale.data.sources.base import Problem, Sample, Source, SourceError
from signscale.data.sources.folder import is_junk, list_tree, normalize_location
from signscale.data.sources.scenes import check_box, scene_meta, scene_sample
from signscale.labels import LabelSpace

_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".webp")


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", s.lower())


def resolve_names(names: Sequence[str], space: LabelSpace) -> list[int | None]:
    """Catalogue id for each class name (None: not in the catalogue)."""
    table: dict[str, int] = {}
    for i, c in enumerate(space.classes):
        table.setdefault(_norm(c.key), i)
        table.setdefault(_norm(c.name), i)
        table.setdefault(str(c.country_id), i)
    return [table.get(_norm(n)) if not n.strip().isdigit() else table.get(str(int(n))) for n in names]


class _AnnotatedScenes(Source):
    """Scenes listed up front (image URL + raw boxes); pixels and box checks happen in :meth:`read`."""

    def __init__(self, kind: str, spec: str, space: LabelSpace, items: list[dict[str, Any]], problems: list[Problem],
                 max_pixels: int) -> None:
        super().__init__(space, spec)
        self.kind = kind
        self.items = items  # {"key", "url", "boxes": [(where, box, class id or None, fmt)], "problems": [...]}
        self.problems = problems
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def read(self, index: int) -> Sample | Problem:
        it = self.items[index]
        try:
            arr = images.decode(storage.read_bytes(it["url"]), max_pixels=self.max_pixels)
        except images.ImageError as exc:
            return Problem(it["key"], exc.reason, exc.detail, self.spec)
        except (FileNotFoundError, storage.StorageError) as exc:
            return Problem(it["key"], "missing_file", str(exc), self.spec)
        h, w = arr.shape[:2]
        boxes, labels, problems = [], [], list(it["problems"])
        for where, raw, cid, fmt in it["boxes"]:
            if cid is None:
                problems.append(f"{where}: class_not_in_catalogue ({raw[4]!r} is not a {self.label_space.name} class)")
                continue
            box = _to_xyxy(raw, fmt, w, h)
            fixed, why = check_box(box, w, h)
            if why:
                problems.append(f"{where}: {why} ({[round(v, 1) for v in box]} in a {w}x{h} image)")
            if fixed is not None:
                boxes.append(fixed)
                labels.append(cid)
        meta = scene_meta(boxes, labels, [self.label_space[c].country for c in labels], w, h, problems)
        return scene_sample(it["key"], arr, meta, source=self.spec,
                            country=self.label_space[labels[0]].country if labels else "de")

    def describe(self) -> dict[str, Any]:
        reasons: dict[str, int] = {}
        for p in self.problems:
            reasons[p.reason] = reasons.get(p.reason, 0) + 1
        return {**super().describe(), "problems": reasons}


def _to_xyxy(raw: Sequence[Any], fmt: str, w: int, h: int) -> list[float]:
    a, b, c, d = (float(v) for v in raw[:4])
    if fmt == "yolo":  # normalised centre and size
        return [(a - c / 2) * w, (b - d / 2) * h, (a + c / 2) * w, (b + d / 2) * h]
    return [a, b, a + c, b + d]  # coco: pixel x, y, width, height


# ---------------------------------------------------------------------------------------------
# YOLO


def _yolo_names(root: str, files: set[str]) -> list[str]:
    for cand in ("data.yaml", "dataset.yaml"):
        if cand in files:
            import yaml

            data = yaml.safe_load(storage.read_text(storage.join(root, cand))) or {}
            names = data.get("names")
            if isinstance(names, dict):
                return [str(names[k]) for k in sorted(names, key=int)]
            if isinstance(names, list):
                return [str(n) for n in names]
            raise SourceError(f"{storage.join(root, cand)}: no 'names:' list or mapping")
    for cand in ("classes.txt", "names.txt", "obj.names"):
        if cand in files:
            return [ln.strip() for ln in storage.read_text(storage.join(root, cand)).splitlines() if ln.strip()]
    raise SourceError(f"{root}: no class names; add data.yaml (names: [...]) or classes.txt (one name per line)")


def open_yolo(location: str, *, spec: str = "", split: str = "", country: str = "de",
              max_pixels: str | int = str(images.DEFAULT_MAX_PIXELS)) -> _AnnotatedScenes:
    """``yolo:DIR[?split=train&country=de]``."""
    root = normalize_location(location)
    if not location or not storage.exists(root):
        raise SourceError(f"yolo: {location!r} is not a folder; expected DIR with images/ and labels/")
    space = LabelSpace.for_country(country)
    files = [f for f in list_tree(root) if not is_junk(f)]
    top = {f for f in files if "/" not in f}
    names = _yolo_names(root, top)
    ids = resolve_names(names, space)
    img_dir = posixpath.join("images", split) if split else "images"
    lbl_dir = posixpath.join("labels", split) if split else "labels"
    imgs = {posixpath.splitext(posixpath.relpath(f, img_dir))[0]: f for f in files
            if f.startswith(img_dir + "/") and f.lower().endswith(_IMAGE_EXT)}
    lbls = {posixpath.splitext(posixpath.relpath(f, lbl_dir))[0]: f for f in files
            if f.startswith(lbl_dir + "/") and f.endswith(".txt")}
    if not imgs:
        raise SourceError(f"yolo: no images under {storage.join(root, img_dir)}")
    problems = [Problem(lbls[k], "label_without_image", f"no image {k}.* under {img_dir}/")
                for k in sorted(set(lbls) - set(imgs))]
    items = []
    for stem in sorted(imgs):
        item = {"key": imgs[stem], "url": storage.join(root, imgs[stem]), "boxes": [], "problems": []}
        if stem not in lbls:
            item["problems"].append(f"{imgs[stem]}: missing_label_file (no {lbl_dir}/{stem}.txt; kept as a scene "
                                    "without signs)")
        else:
            text = storage.read_text(storage.join(root, lbls[stem]))
            for n, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                where = f"{lbls[stem]}:{n}"
                parts = line.split()
                try:
                    c = int(parts[0])
                    vals = [float(v) for v in parts[1:5]]
                    if len(parts) != 5:
                        raise ValueError
                except (ValueError, IndexError):
                    item["problems"].append(f"{where}: bad_line (expected 'class cx cy w h', got {line[:60]!r})")
                    continue
                cid = ids[c] if 0 <= c < len(ids) else None
                item["boxes"].append((where, [*vals, names[c] if 0 <= c < len(names) else str(c)], cid, "yolo"))
        items.append(item)
    return _AnnotatedScenes("yolo", spec or f"yolo:{location}", space, items, problems, int(max_pixels))


# ---------------------------------------------------------------------------------------------
# COCO


def open_coco(location: str, *, spec: str = "", images: str = "", country: str = "de",
              max_pixels: str | int = str(images.DEFAULT_MAX_PIXELS)) -> _AnnotatedScenes:
    """``coco:FILE.json[?images=DIR&country=de]``."""
    url = normalize_location(location)
    if not location or not storage.exists(url):
        raise SourceError(f"coco: {location!r}: no such file; expected a COCO annotations JSON")
    try:
        doc = json.loads(storage.read_text(url))
    except json.JSONDecodeError as exc:
        raise SourceError(f"coco: {location}: not valid JSON ({exc})") from None
    for k in ("images", "annotations", "categories"):
        if not isinstance(doc.get(k), list):
            raise SourceError(f"coco: {location}: missing the '{k}' list of a COCO file")
    space = LabelSpace.for_country(country)
    cats = {c["id"]: str(c.get("name", c["id"])) for c in doc["categories"] if "id" in c}
    cat_ids = dict(zip(cats, resolve_names(list(cats.values()), space)))
    base = posixpath.dirname(url)
    img_root = normalize_location(images) if images else base
    listed = set(list_tree(img_root)) if storage.exists(img_root) else set()
    if not images and storage.exists(storage.join(base, "images")):
        sub = set(list_tree(storage.join(base, "images")))
        if not any(im.get("file_name") in listed for im in doc["images"]):
            img_root, listed = storage.join(base, "images"), sub
    by_id: dict[Any, dict[str, Any]] = {}
    items: list[dict[str, Any]] = []
    problems: list[Problem] = []
    for k, im in enumerate(doc["images"]):
        name = im.get("file_name")
        if "id" not in im or not name:
            problems.append(Problem(f"{location}:images[{k}]", "bad_image_entry", "needs id and file_name"))
            continue
        item = {"key": name, "url": storage.join(img_root, name), "boxes": [], "problems": []}
        if name not in listed:
            problems.append(Problem(f"{location}:images[{k}]", "missing_file", f"{name} is not under {img_root}"))
            continue
        by_id[im["id"]] = item
        items.append(item)
    for k, a in enumerate(doc["annotations"]):
        where = f"{posixpath.basename(location)}:annotations[{k}]"
        item = by_id.get(a.get("image_id"))
        if item is None:
            problems.append(Problem(where, "label_without_image", f"image_id {a.get('image_id')!r} is not a listed, "
                                                                  "present image"))
            continue
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            item["problems"].append(f"{where}: bad_line (bbox must be [x, y, width, height], got {bbox!r})")
            continue
        cid = cat_ids.get(a.get("category_id"))
        item["boxes"].append((where, [*bbox, cats.get(a.get("category_id"), str(a.get("category_id")))], cid, "coco"))
    return _AnnotatedScenes("coco", spec or f"coco:{location}", space, items, problems, int(max_pixels))
