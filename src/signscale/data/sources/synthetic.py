"""Procedurally rendered signs of all 43 GTSRB classes, so every command can run without a download.

Each class is drawn once per process as a clean front view (shape, border, colours and a pictogram
of its own) and cached; a sample then only costs a perspective warp, a composite over random
clutter, a resize, lighting and, for a configurable share of samples, a weather corruption from
:mod:`signscale.corruptions`. That keeps the rate above a thousand 32 px signs a second on one core.

Sample ``i`` depends only on ``(seed, i)`` through ``np.random.default_rng([seed, i])``, so any
index renders identically in any process or order, which packing workers and ranks rely on.
The random draws that fix label, condition and geometry come first, which lets :meth:`entries`
list labels, conditions and boxes without drawing a pixel.

``designs`` draws each meaning in several national designs (:data:`pictograms.DESIGNS`: German,
Chinese), one chosen per sample from its own generator ``default_rng([seed, i, 1])``; everything
else about sample ``i`` is the default sample's, and without the option nothing changes at all.

Pictograms are simplified, but the flip rules of :mod:`signscale.labels` hold for them: mirror
pairs are drawn as exact mirror images, invariant classes symmetrically, and the others with
digits, text or one-sided figures, so that flip augmentation can be tested on this data.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from signscale.corruptions import CORRUPTIONS, apply_corruption
from signscale.data.sources.base import Sample, Source, SourceError
from signscale.data.sources.pictograms import COUNTRY, DESIGNS, MARGIN, OUTLINES, SPACE, design_of, sign_template
from signscale.labels import LabelError

# --------------------------------------------------------------------------------------------
# Drawing in unit coordinates


# --------------------------------------------------------------------------------------------
# Base shapes. Each draws the sign's plate and returns the frame its pictogram is drawn in.


# --------------------------------------------------------------------------------------------
# Pictograms, each in its own [-1, 1] frame.


# --------------------------------------------------------------------------------------------
# Per-sample randomness


@dataclass(frozen=True)
class _Plan:
    """What :meth:`SyntheticSource.entries` needs: drawn first, so listing never renders pixels."""

    label: int
    condition: str
    severity: int  # 0 when clear
    unit_to_image: np.ndarray  # 3x3 homography: sign unit coords -> output pixel coords
    roi: tuple[int, int, int, int]
    design: str = DESIGNS[0]  # the design drawn (German where the class has no design of that country)


def _viewpoint(rng: np.random.Generator, size: int) -> np.ndarray:
    """Random placement of the sign as one homography: offset . roll . scale . perspective.

    The perspective factor turns the plate by ``yaw`` and ``pitch``: the projected width shrinks
    by their cosines and the far edge gets shorter, as with a camera passing a roadside sign.
    """
    diameter, dx, dy, yaw, pitch, roll = rng.random(6)
    radius = size * (0.25 + 0.21 * diameter)  # the sign spans 50..92% of the image before turning
    slack = size / 2 - radius
    cx, cy = size / 2 + (dx * 2 - 1) * 0.8 * slack, size / 2 + (dy * 2 - 1) * 0.8 * slack
    yaw, pitch, roll = (yaw * 2 - 1) * 0.75, (pitch * 2 - 1) * 0.35, math.radians((roll * 2 - 1) * 10)
    c, s = math.cos(roll) * radius, math.sin(roll) * radius
    place = np.array([[c, -s, cx], [s, c, cy], [0.0, 0.0, 1.0]])
    turn = np.array([[math.cos(yaw), 0.0, 0.0], [0.0, math.cos(pitch), 0.0],
                     [0.25 * math.sin(yaw), 0.25 * math.sin(pitch), 1.0]])
    return place @ turn


_OUTLINE_POINTS = {shape: np.array([(x, y, 1.0) for x, y in pts]).T for shape, pts in OUTLINES.items()}


def _box(h: np.ndarray, shape: str, size: int) -> tuple[int, int, int, int]:
    """The sign's bounding box in output pixels: its outline pushed through the homography."""
    x, y, w = h @ _OUTLINE_POINTS[shape]
    x, y = x / w, y / w
    x1, y1 = max(0, math.floor(x.min())), max(0, math.floor(y.min()))
    x2, y2 = min(size, math.ceil(x.max())), min(size, math.ceil(y.max()))
    return int(x1), int(y1), int(x2), int(y2)


# --------------------------------------------------------------------------------------------
# Pixels

# Scene colours: sky, overcast, foliage, grass, bark, concrete, brick, asphalt, sand, shade.
_PALETTE = np.array([(120, 160, 210), (185, 195, 205), (70, 110, 50), (110, 140, 70), (95, 75, 55),
                     (150, 150, 145), (160, 80, 60), (70, 72, 75), (210, 205, 190), (40, 50, 40)], np.float32)


@functools.lru_cache(maxsize=8)
def _upsampling(w: int, cells: int) -> np.ndarray:
    """A (w, cells) matrix of linear interpolation weights: smooth gradients by two small matmuls."""
    pos = np.clip((np.arange(w) + 0.5) * cells / w - 0.5, 0, cells - 1)
    weights = np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(cells)[None, :]))
    return weights.astype(np.float32)


def _background(rng: np.random.Generator, w: int, pole_x: float, pole_y: float) -> Image.Image:
    """Smooth scene-coloured gradients, a few random shapes (some sign-coloured) and maybe a pole."""
    cells = 4
    grid = _PALETTE[rng.integers(len(_PALETTE), size=(cells, cells))]
    grid = grid + rng.normal(0, 20, size=(cells, cells, 3))
    up = _upsampling(w, cells)
    img = Image.fromarray(_bilinear(grid.astype(np.float32), up))
    draw = ImageDraw.Draw(img)
    for u in rng.random((int(rng.integers(1, 5)), 10)):
        colour = _clutter_colour(u[:5])
        x1, y1, x2, y2 = (u[5:9] * 1.4 - 0.2) * w
        kind = int(u[9] * 3)
        if kind == 0:
            draw.rectangle((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)), fill=colour)
        elif kind == 1:
            draw.ellipse((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)), fill=colour)
        else:
            draw.line((x1, y1, x2, y2), fill=colour, width=max(1, (1 + int((u[9] * 3 - 2) * 3)) * w // 32))
    if rng.random() < 0.6:
        half = w * 0.035
        grey = int(rng.integers(90, 200))
        draw.rectangle((pole_x - half, pole_y, pole_x + half, w), fill=(grey, grey, grey))
    return img


def _bilinear(grid: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Upsample a (cells, cells, 3) grid to (w, w, 3) uint8 with interpolation weights ``up``."""
    cells = grid.shape[0]
    rows = (up @ grid.reshape(cells, -1)).reshape(len(up), cells, 3)  # (w, cells, 3)
    out = up @ rows  # broadcast over rows y: (w, cells) @ (cells, 3) -> (w, 3)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _clutter_colour(u: np.ndarray) -> tuple[int, int, int]:
    """Mostly muted scene colours; now and then a saturated one (shop signs, cars, other signs).

    ``u`` holds five uniform numbers, drawn together with the shape's others to save generator calls.
    """
    if u[0] < 0.25:
        rgb = u[1:4] * 255
    else:
        rgb = np.clip(_PALETTE[int(u[4] * len(_PALETTE))] + (u[1:4] - 0.5) * 70, 0, 255)
    return int(rgb[0]), int(rgb[1]), int(rgb[2])


_LEVELS = np.arange(256, dtype=np.float32)
_CHANNEL_OFFSETS = np.array([0, 256, 512], dtype=np.int16)


def _weathered(label: int, px: int, rng: np.random.Generator, design: str) -> Image.Image:
    """The sign's own wear: brighter or darker than the scene, and faded towards grey."""
    gain = math.exp(rng.normal(0, 0.18))
    fade = rng.uniform(0, 0.2) ** 1.5
    table = np.clip(_LEVELS * gain * (1 - fade) + 150 * fade + 0.5, 0, 255).astype(np.uint8)
    template = sign_template(label, px, design)
    out = table[template]
    out[..., 3] = template[..., 3]
    return Image.fromarray(out)


def _camera(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exposure, white balance, gamma (one lookup table per channel) and sensor noise."""
    gain = math.exp(rng.normal(0, 0.22))
    balance = np.exp(rng.normal(0, 0.06, 3)).astype(np.float32)
    gamma = math.exp(rng.normal(0, 0.18))
    lut = np.power(_LEVELS / 255, gamma)[None, :] * (gain * 255 * balance)[:, None]  # 3 x 256
    x = np.take(lut, img + _CHANNEL_OFFSETS)  # each channel looks up its own row
    x += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(0.5, 4.0))
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def _reduce(canvas: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """Downscale to ``size``, often through a smaller size: the softness of a distant, upscaled sign.

    Two small resizes cost far less than a Gaussian blur of the canvas and look like the real thing
    (GTSRB crops of far signs are upsampled from a few pixels).
    """
    detail = rng.uniform(0.5, 1.6)
    if detail < 1.0:
        small = max(4, round(size * detail))
        return canvas.resize((small, small), Image.BILINEAR).resize((size, size), Image.BILINEAR)
    return canvas.resize((size, size), Image.BILINEAR)


def _render(plan: _Plan, size: int, rng: np.random.Generator) -> np.ndarray:
    """Warp the cached template into a 2x canvas over clutter, reduce, light, add weather."""
    w = 2 * size  # drawing at 2x and reducing smooths the warp's edges
    px = max(64, w)
    to_canvas = np.diag([w / size, w / size, 1.0]) @ plan.unit_to_image
    unit_per_px = 1 / (px / 2 * (1 - MARGIN))  # template pixel (edge) coordinates -> sign unit coordinates
    shift = -px / 2 * unit_per_px
    from_template = np.array([[unit_per_px, 0, shift], [0, unit_per_px, shift], [0, 0, 1]])
    # Warp only the sign's box (PIL's bilinear warp costs per output pixel), then paste it there.
    x1, y1, x2, y2 = (max(0, min(w, v * w // size + d)) for v, d in zip(plan.roi, (-1, -1, 1, 1)))
    inverse = np.linalg.inv(to_canvas @ from_template) @ np.array([[1, 0, x1], [0, 1, y1], [0, 0, 1.0]])
    coeffs = tuple((inverse / inverse[2, 2]).reshape(-1)[:8].tolist())
    fx, fy, fw = to_canvas @ np.array([0.0, 0.9, 1.0])  # where a pole would leave the plate
    canvas = _background(rng, w, fx / fw, fy / fw)
    sign = _weathered(plan.label, px, rng, plan.design)
    if x2 > x1 and y2 > y1:
        sign = sign.transform((x2 - x1, y2 - y1), Image.PERSPECTIVE, coeffs, Image.BILINEAR)
        canvas.paste(sign, (x1, y1), sign)
    img = _camera(np.asarray(_reduce(canvas, size, rng)), rng)
    if plan.condition != "clear":
        img = apply_corruption(img, plan.condition, plan.severity, rng)
    return img


# --------------------------------------------------------------------------------------------
# The source


class SyntheticSource(Source):
    """``n`` rendered signs of the German (GTSRB) classes; sample ``i`` is a pure function of (seed, i)."""

    kind = "synthetic"

    def __init__(self, *, n: int, size: int = 32, seed: int = 0, weather: float = 0.3,
                 conditions: Sequence[str] | Mapping[str, float] | None = None,
                 classes: Sequence[int] | None = None, designs: Sequence[str] | None = None,
                 spec: str = "") -> None:
        _require(isinstance(n, int) and n >= 0, "n", n, "a non-negative integer")
        _require(isinstance(size, int) and 8 <= size <= 1024, "size", size, "an integer from 8 to 1024")
        _require(isinstance(seed, int) and seed >= 0, "seed", seed, "a non-negative integer")
        _require(isinstance(weather, (int, float)) and 0.0 <= weather <= 1.0, "weather", weather,
                 "a probability from 0 to 1")
        super().__init__(SPACE, spec or f"synthetic:?n={n}&size={size}&seed={seed}&weather={weather}")
        self.n, self.size, self.seed, self.weather = n, size, seed, float(weather)
        self.conditions, weights = _condition_weights(conditions, self.weather)
        self._cumulative = np.cumsum(weights) / weights.sum() if len(weights) else weights
        self.classes = _class_ids(classes)
        self.designs = _designs(designs)

    def __len__(self) -> int:
        return self.n

    def _plan(self, rng: np.random.Generator) -> _Plan:
        label = self.classes[int(rng.integers(len(self.classes)))]
        condition, severity = "clear", 0
        if rng.random() < self.weather:
            pick = int(np.searchsorted(self._cumulative, rng.random(), side="right"))
            condition = self.conditions[min(pick, len(self.conditions) - 1)]
            severity = int(rng.integers(1, 6))
        h = _viewpoint(rng, self.size)
        return _Plan(label, condition, severity, h, _box(h, SPACE[label].shape, self.size))

    def _planned(self, index: int) -> tuple[_Plan, np.random.Generator]:
        """The sample's plan (design included) and the generator, positioned for rendering its pixels.

        The design comes from a generator of its own, so asking for designs changes nothing else.
        """
        rng = self._rng(index)
        plan = self._plan(rng)
        if self.designs is not None:
            pick = self.designs[int(np.random.default_rng([self.seed, int(index), 1]).integers(len(self.designs)))]
            plan = dataclasses.replace(plan, design=design_of(SPACE[plan.label].key, pick))
        return plan, rng

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.n:
            raise IndexError(f"synthetic sample {index} is outside 0..{self.n - 1}")
        return np.random.default_rng([self.seed, int(index)])

    def _sample(self, index: int, plan: _Plan, image: np.ndarray | None) -> Sample:
        return Sample(key=f"synthetic/{self.seed}/{index}", label=plan.label, image=image, source="synthetic",
                      track=f"synthetic-{self.seed}-{index}", roi=plan.roi, condition=plan.condition,
                      country=COUNTRY, meta=self._meta(plan))

    def _meta(self, plan: _Plan) -> dict:
        if self.designs is None:  # the default keeps its metadata exactly as before designs existed
            return {"severity": plan.severity}
        return {"severity": plan.severity, "design": plan.design}

    def read(self, index: int) -> Sample:
        plan, rng = self._planned(index)
        return self._sample(index, plan, _render(plan, self.size, rng))

    def entries(self) -> list[Sample]:
        return [self._sample(i, self._planned(i)[0], None) for i in range(self.n)]

    def describe(self) -> dict:
        extra = {} if self.designs is None else {"designs": list(self.designs)}
        return {**super().describe(), "seed": self.seed, "image_size": self.size, "weather": self.weather,
                "conditions": list(self.conditions), "classes": list(self.classes), **extra}


def _require(ok: bool, option: str, value: object, expected: str) -> None:
    if not ok:
        raise SourceError(f"synthetic source: option {option!r} must be {expected}, got {value!r}")


def _condition_weights(conditions: Sequence[str] | Mapping[str, float] | None,
                       weather: float) -> tuple[tuple[str, ...], np.ndarray]:
    """Weather kinds and their relative weights (equal unless given as a mapping)."""
    if conditions is None:
        conditions = CORRUPTIONS
    pairs = list(conditions.items()) if isinstance(conditions, Mapping) else [(c, 1.0) for c in conditions]
    for name, weight in pairs:
        _require(name in CORRUPTIONS, "conditions", name, f"one of {', '.join(CORRUPTIONS)}")
        _require(isinstance(weight, (int, float)) and weight > 0, "conditions", f"{name}:{weight}",
                 "a positive weight")
    _require(len({n for n, _ in pairs}) == len(pairs), "conditions", [n for n, _ in pairs], "without repeats")
    _require(bool(pairs) or weather == 0, "conditions", "", "non-empty when weather > 0")
    return tuple(n for n, _ in pairs), np.array([w for _, w in pairs], dtype=np.float64)


def _designs(designs: Sequence[str] | None) -> tuple[str, ...] | None:
    """The designs to draw from (None: the default, German only, with no extra draw or metadata)."""
    if designs is None:
        return None
    _require(not isinstance(designs, str), "designs", designs, "a list of design names")
    _require(len(designs) > 0, "designs", designs, f"a non-empty list of {', '.join(DESIGNS)} (or 'mixed')")
    for d in designs:
        _require(d in DESIGNS, "designs", d, f"one of {', '.join(DESIGNS)} (or 'mixed' for all)")
    _require(len(set(designs)) == len(designs), "designs", list(designs), "without repeats")
    return tuple(designs)


def _class_ids(classes: Sequence[int] | None) -> tuple[int, ...]:
    if classes is None:
        return tuple(range(len(SPACE)))
    _require(len(classes) > 0, "classes", classes, "a non-empty list of class ids or keys")
    try:
        return tuple(SPACE.check_id(c, "synthetic source option 'classes'") for c in classes)
    except (LabelError, TypeError, ValueError) as exc:
        raise SourceError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# The spec factory: options arrive as strings from ``synthetic:?n=2000&size=32&seed=0``


def open_synthetic(location: str, *, spec: str = "", n: str | int = "2000", size: str | int = "32",
                   seed: str | int = "0", weather: str | float = "0.3", conditions: str | None = None,
                   classes: str | None = None, designs: str | None = None) -> SyntheticSource:
    """Open the synthetic source from spec options.

    ``conditions`` is a comma list of corruption kinds, optionally weighted (``snow:2,rain:1``);
    ``classes`` is a comma list of class ids or keys (``1,2,speed_limit_50``); ``designs`` a comma
    list of national designs drawn with equal chance (``de,cn``), or ``mixed`` for all of them.
    """
    if location:
        raise SourceError(f"synthetic source takes no location, got {location!r}: write 'synthetic:?n=...'")
    return SyntheticSource(n=_parse(int, "n", n), size=_parse(int, "size", size),
                           seed=_parse(int, "seed", seed), weather=_parse(float, "weather", weather),
                           conditions=_parse_conditions(conditions), classes=_parse_classes(classes),
                           designs=_parse_designs(designs), spec=spec)


def _parse(kind: type, option: str, value: object) -> int | float:
    try:
        return kind(value)
    except (TypeError, ValueError):
        expected = "an integer" if kind is int else "a number"
        raise SourceError(f"synthetic source: option {option!r} must be {expected}, got {value!r}") from None


def _parse_conditions(value: str | None) -> dict[str, float] | None:
    if value is None:
        return None
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, _, weight = item.partition(":")
        out[name.strip()] = float(_parse(float, "conditions", weight)) if weight else 1.0
    return out


def _parse_classes(value: str | None) -> list[int] | None:
    if value is None:
        return None
    ids = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        try:
            ids.append(int(item) if item.lstrip("-").isdigit() else SPACE.index(item))
        except LabelError as exc:
            raise SourceError(f"synthetic source: option 'classes': {exc}") from None
    return ids


def _parse_designs(value: str | None) -> list[str] | None:
    if value is None:
        return None
    if value.strip() == "mixed":
        return list(DESIGNS)
    return [part.strip() for part in value.split(",") if part.strip()]
