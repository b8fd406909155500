"""Whole road scenes with boxed signs: the scene Sample convention and ``scenes-synthetic:``.

**A scene is a Sample** whose ``image`` is the whole picture and whose ``meta`` carries the boxes::

    meta = {"boxes": [[x1, y1, x2, y2], ...],   # pixels of the decoded image, x2/y2 exclusive
            "labels": [class id, ...],          # ids in the source's label space
            "countries": ["de", ...],
            "width": W, "height": H,
            "problems": ["gt.txt:12: box_outside_image (...)", ...]}  # boxes dropped while reading

``label`` is the first box's class (0 for a scene without signs) and ``roi`` is None: shard
records need one label, but detection reads ``meta``. Readers of other formats (``gtsdb:``,
``yolo:``, ``coco:``) follow the same convention, so everything downstream is format-blind.

Packing scenes (boxes as per-record extras) and streaming them back (full images plus boxes) are
the dataset's side: :mod:`signscale.data.scene_shards`.

**``scenes-synthetic:``** draws a road scene from ``(seed, index)`` alone: sky, horizon, road with
markings, verges, buildings with windows, trees, poles, cars, sign-coloured clutter; then 0-6 signs
on poles at the road side, sized by distance (log-uniform ``min_px``..``max_px`` tall, so small signs
are common), sometimes two on one pole, sometimes partly hidden by foliage, under the weather of
:mod:`signscale.corruptions`. Sign pictures come from the synthetic renderer, or from any crops source
(``signs=gtsrb:/data/GTSRB_Final_Training_Images.zip?split=val``), so a detector sees real sign
appearances and a held-out split of tracks gives a held-out scene set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from signscale import images
from signscale.corruptions import CORRUPTIONS, apply_corruption
from signscale.data.sources.base import Problem, Sample, Source, SourceError
from signscale.labels import LabelSpace

KIND = "scenes-synthetic"
SCENE_KINDS = ("scenes-synthetic", "gtsdb", "yolo", "coco")
_FACTORIES = {"scenes-synthetic": ("signscale.data.sources.scenes", "open_scenes_synthetic"),
              "gtsdb": ("signscale.data.sources.gtsdb", "open_gtsdb"),
              "yolo": ("signscale.data.sources.annotations", "open_yolo"),
              "coco": ("signscale.data.sources.annotations", "open_coco")}


# ---------------------------------------------------------------------------------------------
# The convention


def scene_meta(boxes: Sequence[Sequence[float]], labels: Sequence[int], countries: Sequence[str], width: int,
               height: int, problems: Sequence[str] = (), **extra: Any) -> dict[str, Any]:
    """The ``meta`` dict of a scene Sample (plain JSON data; see the module docstring)."""
    return {"boxes": [[int(round(v)) for v in b] for b in boxes], "labels": [int(x) for x in labels],
            "countries": list(countries), "width": int(width), "height": int(height),
            "problems": list(problems), **extra}


def scene_sample(key: str, image: bytes | np.ndarray, meta: dict[str, Any], *, source: str = "",
                 condition: str = "clear", country: str = "de") -> Sample:
    labels = meta["labels"]
    return Sample(key=key, label=int(labels[0]) if labels else 0, image=image, source=source, roi=None,
                  condition=condition, country=country, meta=meta)


def check_box(box: Sequence[float], width: int, height: int) -> tuple[list[int] | None, str]:
    """(clipped box or None, problem code or ""): boxes outside the image or of zero area are dropped."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None, "box_not_finite"
    if x2 <= x1 or y2 <= y1:
        return None, "box_zero_area"
    cx1, cy1, cx2, cy2 = max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)
    if cx2 - cx1 < 1 or cy2 - cy1 < 1:
        return None, "box_outside_image"
    clipped = [int(round(cx1)), int(round(cy1)), int(round(cx2)), int(round(cy2))]
    return clipped, ("box_clipped" if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2) else "")


def open_scene_source(spec: str) -> Source:
    """Open a scene source (``scenes-synthetic:``, ``gtsdb:``, ``yolo:``, ``coco:``) from its spec.

    Works whether or not :data:`signscale.data.sources.SOURCES` lists these kinds yet.
    """
    import importlib
    import inspect
    from urllib.parse import parse_qsl

    kind, sep, rest = spec.partition(":")
    if not sep or kind not in _FACTORIES:
        raise SourceError(f"{spec!r} is not a scene source: expected KIND:LOCATION with KIND one of "
                          f"{', '.join(SCENE_KINDS)}")
    location, _, query = rest.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    module, name = _FACTORIES[kind]
    factory = getattr(importlib.import_module(module), name)
    try:
        inspect.signature(factory).bind(location, spec=spec, **options)
    except TypeError as exc:
        valid = [p for p in inspect.signature(factory).parameters if p not in ("location", "spec")]
        raise SourceError(f"{spec!r}: {exc}; options of {kind!r}: {', '.join(valid) or 'none'}") from None
    return factory(location, spec=spec, **options)


def is_scene_spec(spec: str) -> bool:
    return spec.partition(":")[0] in SCENE_KINDS


# ---------------------------------------------------------------------------------------------
# Sign pictures: rendered templates or real crops


class _SignPictures:
    """RGBA sign pictures by class: synthetic templates, or ROI crops from a crops source."""

    def __init__(self, spec: str, space: LabelSpace) -> None:
        self.spec = spec
        self.space = space
        self._source: Source | None = None
        self._by_label: list[np.ndarray] | None = None

    def classes(self) -> list[int]:
        if not self.spec or self.spec == "synthetic":
            return list(range(len(self.space)))
        by = self._index()
        return [c for c in range(len(by)) if len(by[c])]

    def _index(self) -> list[np.ndarray]:
        if self._by_label is None:
            from signscale.data.sources import open_source

            src = open_source(self.spec)
            if src.label_space.fingerprint() != self.space.fingerprint():
                raise SourceError(f"signs={self.spec!r}: its label space {src.label_space.name!r} is not "
                                  f"{self.space.name!r}; scenes use the crops source's classes as they are")
            labels = np.array([e.label if isinstance(e, Sample) else -1 for e in src.entries()], dtype=np.int64)
            self._by_label = [np.nonzero(labels == c)[0] for c in range(len(self.space))]
            self._source = src
        return self._by_label

    def picture(self, label: int, w: int, h: int, rng: np.random.Generator) -> Image.Image:
        """An RGBA picture of class ``label`` resized to w x h (transparent outside a drawn sign)."""
        if not self.spec or self.spec == "synthetic":
            from signscale.data.sources.pictograms import render_template

            tpl = Image.fromarray(render_template(label, 128), "RGBA")
            return tpl.resize((w, h), Image.LANCZOS)
        by = self._index()
        assert self._source is not None
        for _ in range(5):
            s = self._source.read(int(rng.choice(by[label])))
            if isinstance(s, Sample) and s.image is not None:
                try:
                    arr = s.image if isinstance(s.image, np.ndarray) else images.decode(s.image)
                    if s.roi is not None:
                        arr = images.crop_box(arr, s.roi)
                except images.ImageError:
                    continue
                return Image.fromarray(arr).convert("RGBA").resize((w, h), Image.BICUBIC)
        raise SourceError(f"signs={self.spec!r}: could not read a picture of class {label}")

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "space": self.space, "_source": None, "_by_label": self._by_label}


# ---------------------------------------------------------------------------------------------
# The procedural scene


@dataclass(frozen=True)
class SceneStyle:
    """What a synthetic scene looks like; every field is a source option."""

    width: int = 512
    height: int = 320
    min_px: int = 12  # sign height range in pixels (log-uniform)
    max_px: int = 72
    max_signs: int = 6
    empty: float = 0.08  # share of scenes without any sign (false-alarm practice)
    occlusion: float = 0.25  # chance that a sign is partly hidden
    weather: float = 0.3  # chance that the scene gets a weather/sensor corruption


def _noise_field(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int], amp: float) -> np.ndarray:
    small = rng.normal(0, amp, size=(cells[0], cells[1])).astype(np.float32)
    return np.asarray(Image.fromarray(small, "F").resize((w, h), Image.BILINEAR))


def _u(rng: np.random.Generator, a: float, b: float) -> float:
    """Uniform between a and b in either order (perspective can swap a road edge and its margin)."""
    return float(rng.uniform(min(a, b), max(a, b)))


def _colour(rng: np.random.Generator, base: Sequence[int], spread: float = 18) -> tuple[int, int, int]:
    c = np.clip(np.asarray(base, np.float32) + rng.normal(0, spread, 3), 0, 255)
    return int(c[0]), int(c[1]), int(c[2])


_SKIES = ((120, 160, 215), (175, 185, 200), (200, 200, 205), (90, 130, 190))
_VERGES = ((85, 125, 60), (110, 135, 70), (130, 120, 85), (100, 100, 95))
_WALLS = ((170, 160, 150), (150, 85, 65), (200, 195, 180), (120, 120, 125), (190, 170, 120))
_CARS = ((200, 30, 35), (30, 60, 150), (230, 230, 230), (30, 30, 30), (150, 150, 155), (240, 190, 30))
_CLUTTER = ((205, 30, 40), (25, 80, 170), (245, 245, 240), (250, 190, 20), (30, 150, 70))


class _Road:
    """Geometry of the road: the horizon row and the road's edges at any row."""

    def __init__(self, rng: np.random.Generator, w: int, h: int) -> None:
        self.w, self.h = w, h
        self.horizon = int(h * rng.uniform(0.33, 0.5))
        self.vx = w * rng.uniform(0.38, 0.62)
        self.left_bottom = w * rng.uniform(-0.25, 0.2)
        self.right_bottom = w * rng.uniform(0.8, 1.25)

    def edges(self, y: float) -> tuple[float, float]:
        t = (y - self.horizon) / max(1.0, self.h - self.horizon)
        return self.vx + (self.left_bottom - self.vx) * t, self.vx + (self.right_bottom - self.vx) * t


def _background(rng: np.random.Generator, style: SceneStyle) -> tuple[Image.Image, _Road]:
    """The scene without its signs: sky and ground, buildings, the road and its markings, the roadside.
    The draws happen in this order, so a scene stays the same for its (seed, index)."""
    w, h = style.width, style.height
    road = _Road(rng, w, h)
    img = _sky_and_ground(rng, road, w, h)
    d = ImageDraw.Draw(img)
    _buildings(rng, d, road, w, h)
    _road_and_markings(rng, d, road, h)
    _roadside(rng, d, road, w, h)
    return img, road


def _sky_and_ground(rng: np.random.Generator, road: _Road, w: int, h: int) -> Image.Image:
    sky, verge = np.array(_SKIES[rng.integers(len(_SKIES))], np.float32), np.array(
        _VERGES[rng.integers(len(_VERGES))], np.float32)
    rows = np.arange(h, dtype=np.float32)[:, None, None]
    sky_img = sky * (0.85 + 0.25 * rows / max(1, road.horizon))
    ground = verge + _noise_field(rng, h, w, (8, 16), 14)[:, :, None]
    arr = np.where(rows < road.horizon, sky_img, ground)
    arr = arr + _noise_field(rng, h, w, (4, 6), 10)[:, :, None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _buildings(rng: np.random.Generator, d: ImageDraw.ImageDraw, road: _Road, w: int, h: int) -> None:
    """Buildings on the horizon, with window grids (high-frequency clutter a detector must ignore)."""
    x = -rng.uniform(0, 40)
    while x < w:
        bw, bh = rng.uniform(30, 110), rng.uniform(0.05, 0.32) * h
        if rng.random() < 0.7:
            wall = _colour(rng, _WALLS[rng.integers(len(_WALLS))])
            d.rectangle((x, road.horizon - bh, x + bw, road.horizon + 2), fill=wall)
            win = _colour(rng, (60, 70, 90), 25)
            step = rng.uniform(6, 12)
            for wy in np.arange(road.horizon - bh + 4, road.horizon - 4, step):
                for wx in np.arange(x + 3, x + bw - 5, step):
                    d.rectangle((wx, wy, wx + step * 0.5, wy + step * 0.55), fill=win)
            if rng.random() < 0.3:  # a shop sign in sign colours
                c = _CLUTTER[rng.integers(len(_CLUTTER))]
                d.rectangle((x + 4, road.horizon - bh * 0.5, x + bw * 0.7, road.horizon - bh * 0.4), fill=c)
        x += bw + rng.uniform(0, 30)


def _road_and_markings(rng: np.random.Generator, d: ImageDraw.ImageDraw, road: _Road, h: int) -> None:
    d.polygon([(road.vx - 2, road.horizon), (road.vx + 2, road.horizon), (road.right_bottom, h),
               (road.left_bottom, h)], fill=_colour(rng, (78, 78, 82), 10))
    for k in range(12):
        y0 = road.horizon + (h - road.horizon) * (k / 12) ** 1.6
        y1 = road.horizon + (h - road.horizon) * ((k + 0.5) / 12) ** 1.6
        (a0, b0), (a1, b1) = road.edges(y0), road.edges(y1)
        cx0, cx1 = (a0 + b0) / 2, (a1 + b1) / 2
        ww0, ww1 = (b0 - a0) * 0.012, (b1 - a1) * 0.012
        d.polygon([(cx0 - ww0, y0), (cx0 + ww0, y0), (cx1 + ww1, y1), (cx1 - ww1, y1)], fill=(225, 225, 220))


def _roadside(rng: np.random.Generator, d: ImageDraw.ImageDraw, road: _Road, w: int, h: int) -> None:
    """Trees, poles, cars and sign-coloured clutter: what a detector must learn is not a sign."""
    for _ in range(int(rng.integers(2, 9))):
        y = rng.uniform(road.horizon, h)
        s = 8 + 80 * (y - road.horizon) / (h - road.horizon)
        left, right = road.edges(y)
        tx = _u(rng, -40, left - s) if rng.random() < 0.5 else _u(rng, right + s, w + 40)
        d.rectangle((tx - s * 0.08, y - s * 1.2, tx + s * 0.08, y), fill=_colour(rng, (90, 70, 50)))
        d.ellipse((tx - s * 0.6, y - s * 2.2, tx + s * 0.6, y - s * 0.9), fill=_colour(rng, (60, 100, 45), 25))
    for _ in range(int(rng.integers(0, 5))):
        y = rng.uniform(road.horizon + 5, h)
        s = 6 + 50 * (y - road.horizon) / (h - road.horizon)
        left, right = road.edges(y)
        px = _u(rng, -20, left) if rng.random() < 0.5 else _u(rng, right, w + 20)
        d.rectangle((px - s * 0.05, y - s * 3, px + s * 0.05, y), fill=_colour(rng, (120, 120, 120)))
    for _ in range(int(rng.integers(0, 4))):
        y = rng.uniform(road.horizon + 8, h)
        left, right = road.edges(y)
        s = 10 + 90 * (y - road.horizon) / (h - road.horizon)
        cx = _u(rng, left + s * 0.6, right - s * 0.6)
        d.rectangle((cx - s * 0.6, y - s * 0.6, cx + s * 0.6, y), fill=_colour(rng, _CARS[rng.integers(len(_CARS))]))
        d.rectangle((cx - s * 0.45, y - s * 0.55, cx + s * 0.45, y - s * 0.32), fill=(40, 45, 55))
        for sx in (-0.45, 0.35):
            d.rectangle((cx + s * sx, y - s * 0.2, cx + s * (sx + 0.1), y - s * 0.12), fill=(210, 40, 30))
    for _ in range(int(rng.integers(1, 6))):
        c = _CLUTTER[rng.integers(len(_CLUTTER))]
        x0, y0 = rng.uniform(0, w), rng.uniform(road.horizon * 0.6, h)
        s = rng.uniform(4, 30)
        if rng.random() < 0.5:
            d.rectangle((x0, y0, x0 + s * rng.uniform(0.5, 3), y0 + s * rng.uniform(0.3, 1)), fill=c)
        else:
            d.ellipse((x0, y0, x0 + s, y0 + s * rng.uniform(0.6, 1.4)), fill=c)


def _iou_any(box: Sequence[float], others: Sequence[Sequence[float]], pad: float) -> bool:
    for o in others:
        if box[0] - pad < o[2] and o[0] < box[2] + pad and box[1] - pad < o[3] and o[1] < box[3] + pad:
            return True
    return False


def render_scene(rng: np.random.Generator, style: SceneStyle, pictures: _SignPictures, classes: Sequence[int]
                 ) -> tuple[np.ndarray, list[list[int]], list[int], str, list[float]]:
    """(HxWx3 uint8 image, boxes, labels, condition, occluded fraction per box) for one scene."""
    img, road = _background(rng, style)
    w, h = style.width, style.height
    d = ImageDraw.Draw(img)
    n = 0 if rng.random() < style.empty else int(rng.integers(1, style.max_signs + 1))
    boxes: list[list[int]] = []
    labels: list[int] = []
    occluded: list[float] = []
    lo, hi = math.log(style.min_px), math.log(style.max_px)
    attempts = 0
    while len(boxes) < n and attempts < 6 * n:
        attempts += 1
        sh = int(round(math.exp(rng.uniform(lo, hi))))
        stack = 2 if rng.random() < 0.2 else 1
        label_set = [int(classes[rng.integers(len(classes))]) for _ in range(stack)]
        # closer signs are bigger and stand lower in the picture
        near = (math.log(sh) - lo) / max(1e-6, hi - lo)
        ground = road.horizon + (h - road.horizon) * min(0.98, 0.05 + 0.75 * near * rng.uniform(0.7, 1.2))
        left, right = road.edges(ground)
        side = -1 if rng.random() < 0.5 else 1
        sw = max(4, int(round(sh * rng.uniform(0.85, 1.0))))
        cx = (left - sw * rng.uniform(0.3, 2.0)) if side < 0 else (right + sw * rng.uniform(0.3, 2.0))
        cx = float(np.clip(cx, sw / 2 + 1, w - sw / 2 - 1))
        pole_h = sh * rng.uniform(0.8, 2.0)
        top = ground - pole_h - sh * stack
        if top < 1:
            continue
        placed = [[int(round(cx - sw / 2)), int(round(top + k * sh * 1.02)), 0, 0] for k in range(stack)]
        for b in placed:
            b[2], b[3] = b[0] + sw, b[1] + sh
        if any(b[3] > h - 1 for b in placed) or any(_iou_any(b, boxes, 2) for b in placed):
            continue
        pole_w = max(1, sw // 10)
        d.rectangle(
            (cx - pole_w / 2, placed[0][1] + sh / 2, cx + pole_w / 2, ground), fill=_colour(rng, (125, 125, 128), 10)
        )
        for b, lab in zip(placed, label_set):
            pasted = _paste_sign(rng, img, d, pictures.picture(lab, b[2] - b[0], b[3] - b[1], rng), b, style)
            if pasted is not None:
                boxes.append(pasted[0])
                labels.append(lab)
                occluded.append(pasted[1])
    arr = np.asarray(img, dtype=np.uint8)
    condition = "clear"
    if rng.random() < style.weather:
        condition = str(CORRUPTIONS[rng.integers(len(CORRUPTIONS))])
        arr = apply_corruption(arr, condition, int(rng.integers(1, 4)), rng, scale=_weather_scale(boxes))
    return arr, boxes, labels, condition, occluded


def _paste_sign(rng: np.random.Generator, img: Image.Image, d: ImageDraw.ImageDraw, pic: Image.Image,
                b: list[int], style: SceneStyle) -> tuple[list[int], float] | None:
    """Paste one sign picture under its own light at ``b``; (its tight box, occluded fraction), or
    None when the picture has no visible pixel. Sometimes foliage or a post covers part of it."""
    light = rng.uniform(0.65, 1.15)
    rgb = np.clip(np.asarray(pic, np.float32)[:, :, :3] * light, 0, 255).astype(np.uint8)
    pic = Image.fromarray(np.dstack([rgb, np.asarray(pic)[:, :, 3]]), "RGBA")
    img.paste(pic, (b[0], b[1]), pic)
    ys, xs = np.nonzero(np.asarray(pic)[:, :, 3] > 24)
    if len(xs) == 0:
        return None
    box = [b[0] + int(xs.min()), b[1] + int(ys.min()), b[0] + int(xs.max()) + 1, b[1] + int(ys.max()) + 1]
    frac = 0.0
    if rng.random() < style.occlusion:
        bw_, bh_ = box[2] - box[0], box[3] - box[1]
        frac = rng.uniform(0.1, 0.35)
        cover = (box[0] - bw_ * 0.3, box[1] + bh_ * (1 - frac), box[2] + bw_ * 0.3, box[3] + bh_ * 0.5) \
            if rng.random() < 0.5 else (box[0] + bw_ * (1 - frac), box[1] - bh_ * 0.3, box[2] + bw_ * 0.4,
                                        box[3] + bh_ * 0.3)
        d.ellipse(cover, fill=_colour(rng, (60, 100, 45), 25))
    return box, round(float(frac), 3)


def _weather_scale(boxes: list[list[int]]) -> float:
    """Spatial size of a scene's weather: its signs' median height over the 32 px the corruptions are
    tuned at, so a blur or a snow flake is as large on each sign as on a crop of the same severity
    (scaled by the scene's width instead, a blur would be ten times wider than the signs)."""
    if not boxes:
        return 1.0
    return float(np.clip(np.median([b[3] - b[1] for b in boxes]) / 32.0, 0.5, 2.5))


class SceneSynthSource(Source):
    """``n`` procedural road scenes; scene ``i`` depends only on ``(seed, i)`` (any process, any order)."""

    kind = KIND

    def __init__(self, *, n: int, seed: int = 0, style: SceneStyle = SceneStyle(), signs: str = "synthetic",
                 spec: str = "") -> None:
        space = LabelSpace.for_country("de")
        super().__init__(space, spec or f"{KIND}:?n={n}&seed={seed}")
        self.n, self.seed, self.style = n, seed, style
        self.pictures = _SignPictures(signs, space)
        self._classes: list[int] | None = None

    def __len__(self) -> int:
        return self.n

    def read(self, index: int) -> Sample | Problem:
        if not 0 <= index < self.n:
            raise IndexError(index)
        if self._classes is None:
            self._classes = self.pictures.classes()
        rng = np.random.default_rng([self.seed, index, 77])
        arr, boxes, labels, condition, occluded = render_scene(rng, self.style, self.pictures, self._classes)
        meta = scene_meta(boxes, labels, ["de"] * len(labels), self.style.width, self.style.height,
                          occluded=occluded)
        return scene_sample(f"scene-{index:07d}", arr, meta, source=self.spec, condition=condition)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "seed": self.seed, "signs": self.pictures.spec,
                "style": {k: getattr(self.style, k) for k in SceneStyle.__dataclass_fields__}}


def open_scenes_synthetic(location: str = "", *, spec: str = "", n: str | int = "1000", seed: str | int = "0",
                          width: str | int = "512", height: str | int = "320", min_px: str | int = "12",
                          max_px: str | int = "72", max_signs: str | int = "6", occlusion: str | float = "0.25",
                          weather: str | float = "0.3", empty: str | float = "0.08",
                          signs: str = "synthetic") -> SceneSynthSource:
    """``scenes-synthetic:?n=1000&seed=0&width=512&height=320&signs=gtsrb:ZIP?split=val``.

    ``signs`` names where sign pictures come from: ``synthetic`` (the renderer) or a crops source
    spec; its own options follow its ``?`` (one option, as ``&`` separates this source's options).
    """
    def num(name: str, value: Any, kind: type, lo: float, hi: float) -> Any:
        try:
            v = kind(value)
        except (TypeError, ValueError):
            raise SourceError(f"{KIND}: option {name}={value!r} is not a {kind.__name__}") from None
        if not lo <= v <= hi:
            raise SourceError(f"{KIND}: option {name}={v} is outside {lo}..{hi}")
        return v

    style = SceneStyle(width=num("width", width, int, 64, 4096), height=num("height", height, int, 64, 4096),
                       min_px=num("min_px", min_px, int, 6, 512), max_px=num("max_px", max_px, int, 6, 1024),
                       max_signs=num("max_signs", max_signs, int, 0, 50),
                       occlusion=num("occlusion", occlusion, float, 0, 1),
                       weather=num("weather", weather, float, 0, 1), empty=num("empty", empty, float, 0, 1))
    if style.max_px < style.min_px or style.max_px * 3 > style.height:
        raise SourceError(f"{KIND}: need min_px <= max_px <= height / 3, got {style.min_px}, {style.max_px}, "
                          f"{style.height}")
    return SceneSynthSource(n=num("n", n, int, 0, 10**9), seed=num("seed", seed, int, 0, 2**32 - 1), style=style,
                            signs=signs, spec=spec)


# ---------------------------------------------------------------------------------------------
# Packing scenes into encoded shards with boxes as per-record extras


# ---------------------------------------------------------------------------------------------
# Streaming scenes: the exactly-once plan of ShardStream, batches of full images plus boxes


