"""Procedurally rendered signs of all 43 GTSRB classes, so every command can run without a download.

Each class is drawn once per process as a clean front view (shape, border, colours and a pictogram
of its own) and cached; a sample then only costs a perspective warp, a composite over random
clutter, a resize, lighting and, for a configurable share of samples, a weather corruption from
:mod:`signscale.corruptions`. That keeps the rate above a thousand 32 px signs a second on one core.

Sample ``i`` depends only on ``(seed, i)`` through ``np.random.default_rng([seed, i])``, so any
index renders identically in any process or order, which packing workers and ranks rely on.
The random draws that fix label, condition and geometry come first, which lets :meth:`entries`
list labels, conditions and boxes without drawing a pixel.

Pictograms are simplified, but the flip rules of :mod:`signscale.labels` hold for them: mirror
pairs are drawn as exact mirror images, invariant classes symmetrically, and the others with
digits, text or one-sided figures, so that flip augmentation can be tested on this data.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from signscale.corruptions import CORRUPTIONS, apply_corruption
from signscale.data.sources.base import Sample, Source, SourceError
from signscale.labels import LabelError, LabelSpace

COUNTRY = "de"
_SPACE = LabelSpace.for_country(COUNTRY)

RGB = tuple[int, int, int]
RED: RGB = (200, 28, 40)
BLUE: RGB = (18, 82, 168)
WHITE: RGB = (244, 244, 238)
BLACK: RGB = (24, 24, 26)
YELLOW: RGB = (250, 186, 20)
GREY: RGB = (135, 135, 135)
GREEN: RGB = (26, 156, 74)
CLEAN_BACKGROUND: RGB = (128, 128, 128)

_MARGIN = 0.04  # share of the template left transparent so antialiased edges are never clipped
_SUPERSAMPLE = 4  # templates are drawn 4x larger and reduced: cheap antialiasing for PIL's drawing

Point = tuple[float, float]


# --------------------------------------------------------------------------------------------
# Drawing in unit coordinates


class _Pen:
    """Draws on a square image in unit coordinates: the sign spans [-1, 1], y points down.

    ``sub`` opens a nested frame (centre, scale, rotation), so a pictogram is written once in its
    own [-1, 1] box and placed in a circle or a triangle by the sign's base shape.
    """

    def __init__(self, draw: ImageDraw.ImageDraw, image: Image.Image, px: int,
                 cx: float = 0.0, cy: float = 0.0, k: float = 1.0, angle: float = 0.0) -> None:
        self.draw, self.image, self.px = draw, image, px
        self.cx, self.cy, self.k, self.angle = cx, cy, k, angle
        # PIL's ellipses and rectangles are mirror-symmetric about px / 2 (pixel edges at integers).
        self.centre = px / 2
        self.unit = px / 2 * (1 - _MARGIN)

    def sub(self, cx: float, cy: float, k: float, angle: float = 0.0) -> _Pen:
        (x, y), = self._to_unit([(cx, cy)])
        return _Pen(self.draw, self.image, self.px, x, y, self.k * k, self.angle + angle)

    def _to_unit(self, pts: Sequence[Point]) -> list[Point]:
        c, s = math.cos(math.radians(self.angle)), math.sin(math.radians(self.angle))
        return [(self.cx + self.k * (c * x - s * y), self.cy + self.k * (s * x + c * y)) for x, y in pts]

    def xy(self, pts: Sequence[Point]) -> list[Point]:
        return [(self.centre + x * self.unit, self.centre + y * self.unit) for x, y in self._to_unit(pts)]

    def length(self, v: float) -> float:
        return v * self.k * self.unit

    def poly(self, pts: Sequence[Point], fill: RGB) -> None:
        self.draw.polygon(self.xy(pts), fill=fill)

    def rect(self, x1: float, y1: float, x2: float, y2: float, fill: RGB) -> None:
        self.poly([(x1, y1), (x2, y1), (x2, y2), (x1, y2)], fill)

    def disc(self, x: float, y: float, r: float, fill: RGB) -> None:
        (cx, cy), = self.xy([(x, y)])
        rr = self.length(r)
        self.draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=fill)

    def ring(self, x: float, y: float, r: float, width: float, fill: RGB) -> None:
        (cx, cy), = self.xy([(x, y)])
        rr = self.length(r)
        width_px = max(1, round(self.length(width)))
        self.draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), outline=fill, width=width_px)

    def line(self, pts: Sequence[Point], width: float, fill: RGB, caps: bool = True) -> None:
        """Thick polyline with round joints and, by default, round caps (PIL's ends are square)."""
        self.draw.line(self.xy(pts), fill=fill, width=max(1, round(self.length(width))), joint="curve")
        if caps:
            for x, y in (pts[0], pts[-1]):
                self.disc(x, y, width / 2, fill)

    def text(self, s: str, x: float, y: float, height: float, max_width: float, fill: RGB) -> None:
        """Bold text whose ink box is centred on (x, y) and fits height x max_width."""
        mask = _text_mask(s, max(8, round(self.length(height))))
        scale = min(self.length(height) / mask.height, self.length(max_width) / mask.width)
        w, h = max(1, round(mask.width * scale)), max(1, round(mask.height * scale))
        mask = mask.resize((w, h), Image.LANCZOS)
        (cx, cy), = self.xy([(x, y)])
        ink = Image.new("RGBA", mask.size, (*fill, 255))
        self.image.paste(ink, (round(cx - w / 2), round(cy - h / 2)), mask)


@functools.lru_cache(maxsize=64)
def _text_mask(s: str, height_px: int) -> Image.Image:
    """An 'L' mask of ``s`` cropped to its ink; stroked so the default font looks like sign lettering."""
    size = round(height_px * 1.45)
    try:
        font: ImageFont.ImageFont | ImageFont.FreeTypeFont = ImageFont.load_default(size=size)
        stroke = max(1, round(size * 0.055))
    except TypeError:  # Pillow < 10.1 has only the small bitmap font; it is scaled up by the caller
        font, stroke = ImageFont.load_default(), 0
    canvas = Image.new("L", (size * (len(s) + 2), size * 2), 0)
    ImageDraw.Draw(canvas).text((size // 2, size // 2), s, fill=255, font=font, stroke_width=stroke,
                                stroke_fill=255)
    return canvas.crop(canvas.getbbox())


def _arc(cx: float, cy: float, r: float, a0: float, a1: float, n: int = 14) -> list[Point]:
    """Points on a circle from angle a0 to a1 in degrees (y down, so positive angles turn clockwise)."""
    a = np.radians(np.linspace(a0, a1, n))
    return [(cx + r * math.cos(t), cy + r * math.sin(t)) for t in a]


def _arrow(pen: _Pen, pts: Sequence[Point], width: float, fill: RGB, head: float = 0.5,
           head_width: float = 0.8) -> None:
    """A thick polyline ending in a triangular head at its last point, aligned with the path's end."""
    shaft, base = _cut_before_end(pts, head)
    x2, y2 = pts[-1]
    d = math.hypot(x2 - base[0], y2 - base[1])
    nx, ny = -(y2 - base[1]) / d * head_width / 2, (x2 - base[0]) / d * head_width / 2
    pen.line([*shaft, base], width, fill, caps=False)
    pen.disc(*pts[0], width / 2, fill)
    pen.poly([(x2, y2), (base[0] + nx, base[1] + ny), (base[0] - nx, base[1] - ny)], fill)


def _cut_before_end(pts: Sequence[Point], length: float) -> tuple[list[Point], Point]:
    """Split a polyline ``length`` before its end: the points kept, and the point where it is cut."""
    remaining = length
    for i in range(len(pts) - 1, 0, -1):
        (x1, y1), (x2, y2) = pts[i - 1], pts[i]
        seg = math.hypot(x2 - x1, y2 - y1)
        if seg >= remaining:
            t = remaining / seg
            return list(pts[:i]), (x2 - t * (x2 - x1), y2 - t * (y2 - y1))
        remaining -= seg
    return [pts[0]], pts[0]


def _scaled(pts: Sequence[Point], about: Point, f: float) -> list[Point]:
    return [(about[0] + f * (x - about[0]), about[1] + f * (y - about[1])) for x, y in pts]


# --------------------------------------------------------------------------------------------
# Base shapes. Each draws the sign's plate and returns the frame its pictogram is drawn in.

_SQRT3_2 = math.sqrt(3) / 2
TRIANGLE: list[Point] = [(0.0, -_SQRT3_2), (1.0, _SQRT3_2), (-1.0, _SQRT3_2)]
INVERTED_TRIANGLE: list[Point] = [(-1.0, -_SQRT3_2), (1.0, -_SQRT3_2), (0.0, _SQRT3_2)]
OCTAGON: list[Point] = [(math.cos(math.radians(22.5 + 45 * k)), math.sin(math.radians(22.5 + 45 * k)))
                        for k in range(8)]
DIAMOND: list[Point] = [(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)]
CIRCLE: list[Point] = [(math.cos(t), math.sin(t))
                       for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
OUTLINES: dict[str, list[Point]] = {
    "circle": CIRCLE, "triangle": TRIANGLE, "inverted_triangle": INVERTED_TRIANGLE, "octagon": OCTAGON,
    "diamond": DIAMOND,
}


def _prohibitory(pen: _Pen) -> _Pen:
    pen.disc(0, 0, 1.0, WHITE)
    pen.disc(0, 0, 0.95, RED)
    pen.disc(0, 0, 0.74, WHITE)
    return pen.sub(0, 0, 0.62)


def _red_disc(pen: _Pen) -> _Pen:
    pen.disc(0, 0, 1.0, WHITE)
    pen.disc(0, 0, 0.95, RED)
    return pen.sub(0, 0, 0.62)


def _end(pen: _Pen) -> _Pen:
    pen.disc(0, 0, 1.0, BLACK)
    pen.disc(0, 0, 0.95, WHITE)
    return pen.sub(0, 0, 0.62)


def _mandatory(pen: _Pen) -> _Pen:
    pen.disc(0, 0, 1.0, WHITE)
    pen.disc(0, 0, 0.95, BLUE)
    return pen.sub(0, 0, 0.62)


def _danger(pen: _Pen) -> _Pen:
    centroid = (0.0, _SQRT3_2 / 3)
    pen.poly(TRIANGLE, WHITE)
    pen.poly(_scaled(TRIANGLE, centroid, 0.94), RED)
    pen.poly(_scaled(TRIANGLE, centroid, 0.66), WHITE)
    return pen.sub(0, 0.24, 0.4)


def _yield(pen: _Pen) -> _Pen:
    centroid = (0.0, -_SQRT3_2 / 3)
    pen.poly(INVERTED_TRIANGLE, WHITE)
    pen.poly(_scaled(INVERTED_TRIANGLE, centroid, 0.94), RED)
    pen.poly(_scaled(INVERTED_TRIANGLE, centroid, 0.55), WHITE)
    return pen.sub(0, -0.24, 0.4)


def _octagon(pen: _Pen) -> _Pen:
    pen.poly(OCTAGON, WHITE)
    pen.poly(_scaled(OCTAGON, (0, 0), 0.94), RED)
    return pen.sub(0, 0, 0.7)


def _diamond(pen: _Pen) -> _Pen:
    pen.poly(DIAMOND, BLACK)
    pen.poly(_scaled(DIAMOND, (0, 0), 0.96), WHITE)
    pen.poly(_scaled(DIAMOND, (0, 0), 0.6), YELLOW)
    return pen.sub(0, 0, 0.5)


# --------------------------------------------------------------------------------------------
# Pictograms, each in its own [-1, 1] frame.

Pictogram = Callable[[_Pen], None]


def _number(text: str, colour: RGB = BLACK) -> Pictogram:
    return lambda pen: pen.text(text, 0, 0, 1.15, 1.9, colour)


def _end_stripes(pen: _Pen) -> None:
    """Thin parallel bands from top right to bottom left, clipped to the plate (the "end of" mark)."""
    r, ux, uy = 0.95 / 0.62, -math.sqrt(0.5), math.sqrt(0.5)  # frame units; direction of the bands
    for off in np.linspace(-0.34, 0.34, 5):
        px, py = off * math.sqrt(0.5), off * math.sqrt(0.5)
        half = math.sqrt(r * r - off * off) - 0.05
        ends = [(px - ux * half, py - uy * half), (px + ux * half, py + uy * half)]
        pen.line(ends, 0.055, BLACK, caps=False)


def _car_rear(pen: _Pen, x: float, y: float, s: float, colour: RGB) -> None:
    p = pen.sub(x, y, s)
    p.poly([(-0.32, -0.55), (0.32, -0.55), (0.45, -0.1), (-0.45, -0.1)], colour)  # cabin
    p.rect(-0.55, -0.12, 0.55, 0.35, colour)  # body
    p.rect(-0.5, 0.3, -0.28, 0.55, colour)  # wheels
    p.rect(0.28, 0.3, 0.5, 0.55, colour)
    p.poly([(-0.24, -0.45), (0.24, -0.45), (0.32, -0.18), (-0.32, -0.18)], WHITE)  # rear window


def _truck_rear(pen: _Pen, x: float, y: float, s: float, colour: RGB) -> None:
    p = pen.sub(x, y, s)
    p.rect(-0.55, -0.75, 0.55, 0.35, colour)
    p.rect(-0.5, 0.3, -0.25, 0.6, colour)
    p.rect(0.25, 0.3, 0.5, 0.6, colour)


def _truck_side(pen: _Pen, colour: RGB = BLACK) -> None:
    """A lorry in profile, cab on the right: one-sided, so never flipped."""
    pen.rect(-0.95, -0.5, 0.28, 0.22, colour)  # cargo box
    pen.poly([(0.34, -0.3), (0.7, -0.3), (0.92, 0.0), (0.92, 0.22), (0.34, 0.22)], colour)  # cab
    pen.poly([(0.42, -0.22), (0.66, -0.22), (0.8, -0.02), (0.42, -0.02)], WHITE)  # windscreen
    for wx in (-0.7, -0.4, 0.62):
        pen.disc(wx, 0.32, 0.15, colour)


def _no_passing(left: Callable[..., None], left_colour: RGB, right_colour: RGB) -> Pictogram:
    def draw(pen: _Pen) -> None:
        left(pen, -0.45, 0.05, 0.8, left_colour)
        _car_rear(pen, 0.5, 0.05, 0.8, right_colour)
    return draw


def _ahead(pen: _Pen) -> None:
    _arrow(pen, [(0, 0.95), (0, -0.95)], 0.34, WHITE, head=0.62, head_width=0.95)


def _turn_right(pen: _Pen) -> None:
    path = [(-0.4, 0.95), *_arc(0.15, 0.05, 0.55, 180, 270), (0.95, -0.5)]
    _arrow(pen, path, 0.32, WHITE, head=0.55, head_width=0.9)


def _straight_or_right(pen: _Pen) -> None:
    _arrow(pen, [(-0.3, 0.95), (-0.3, -0.95)], 0.28, WHITE, head=0.5, head_width=0.78)
    _arrow(pen, [*_arc(0.2, 0.4, 0.5, 180, 270), (0.95, -0.1)], 0.28, WHITE, head=0.5, head_width=0.78)


def _keep_right(pen: _Pen) -> None:
    _arrow(pen, [(-0.6, -0.6), (0.65, 0.65)], 0.34, WHITE, head=0.62, head_width=0.95)


def _roundabout(pen: _Pen) -> None:
    """Three arrows chasing each other anticlockwise (as seen), which a flip would reverse."""
    for i in range(3):
        a0 = 100 + 120 * i
        _arrow(pen, _arc(0, 0, 0.74, a0, a0 - 88, 12), 0.26, WHITE, head=0.45, head_width=0.66)


def _no_entry_bar(pen: _Pen) -> None:
    pen.rect(-1.25, -0.28, 1.25, 0.28, WHITE)


def _right_of_way(pen: _Pen) -> None:
    pen.poly([(-0.13, -1.0), (0.13, -1.0), (0.22, 0.95), (-0.22, 0.95)], BLACK)
    pen.rect(-0.72, -0.3, 0.72, -0.12, BLACK)


def _caution(pen: _Pen) -> None:
    pen.poly([(-0.2, -1.0), (0.2, -1.0), (0.09, 0.4), (-0.09, 0.4)], BLACK)
    pen.disc(0, 0.75, 0.19, BLACK)


def _curve_left(pen: _Pen) -> None:
    path = [(0.4, 0.95), (0.4, 0.2), *_arc(-0.6, 0.2, 1.0, 0, -72, 12)]
    _arrow(pen, path, 0.28, BLACK, head=0.5, head_width=0.75)


def _double_curve(pen: _Pen) -> None:
    t = np.linspace(0, 1, 24)
    path = [(-0.5 * math.sin(2 * math.pi * v), 0.95 - 1.75 * v) for v in t]
    _arrow(pen, path, 0.22, BLACK, head=0.4, head_width=0.6)


def _bumpy(pen: _Pen) -> None:
    xs = np.linspace(-0.95, 0.95, 41)
    top = [(float(x), 0.5 - 0.75 * abs(math.sin(math.pi * x / 0.95))) for x in xs]
    pen.poly([*top, (0.95, 0.75), (-0.95, 0.75)], BLACK)


def _slippery(pen: _Pen) -> None:
    _car_rear(pen.sub(0.1, -0.45, 0.85, angle=-16), 0, 0, 1, BLACK)
    for x0 in (-0.35, 0.35):
        ys = np.linspace(0.1, 0.95, 12)
        path = [(x0 + 0.12 + 0.2 * math.sin(4.5 * (y - 0.1)) - 0.25 * (y - 0.1), float(y)) for y in ys]
        pen.line(path, 0.1, BLACK)


def _narrows_right(pen: _Pen) -> None:
    pen.line([(-0.5, 0.95), (-0.5, -0.95)], 0.2, BLACK)
    pen.line([(0.55, 0.95), (0.55, 0.25), (0.12, -0.25), (0.12, -0.95)], 0.2, BLACK)


def _road_work(pen: _Pen) -> None:
    pen.disc(0.3, -0.72, 0.17, BLACK)  # head
    pen.line([(0.22, -0.5), (0.05, 0.15)], 0.24, BLACK)  # torso, bent over the shovel
    pen.line([(0.05, 0.15), (-0.15, 0.92)], 0.15, BLACK)
    pen.line([(0.05, 0.15), (0.45, 0.5), (0.5, 0.92)], 0.15, BLACK)
    pen.line([(0.18, -0.38), (-0.2, -0.05)], 0.12, BLACK)  # arm
    pen.line([(0.0, -0.5), (-0.5, 0.5)], 0.08, BLACK)  # shovel handle
    pen.poly([(-0.62, 0.42), (-0.4, 0.52), (-0.55, 0.78), (-0.75, 0.65)], BLACK)  # blade
    pen.poly([(-1.0, 0.95), (-0.85, 0.72), (-0.7, 0.95)], BLACK)  # heap


def _signals(pen: _Pen) -> None:
    pen.rect(-0.36, -1.0, 0.36, 1.0, BLACK)
    for y, c in ((-0.62, RED), (0.0, YELLOW), (0.62, GREEN)):
        pen.disc(0, y, 0.24, c)


def _walker(pen: _Pen, x: float, y: float, s: float) -> None:
    """A person striding to the right and leaning into the step: one-sided by design."""
    p = pen.sub(x, y, s)
    p.disc(0.22, -0.78, 0.17, BLACK)
    p.line([(0.16, -0.55), (0.0, 0.1)], 0.24, BLACK)
    p.line([(0.0, 0.1), (0.42, 0.5), (0.45, 0.95)], 0.15, BLACK)  # front leg, bent knee
    p.line([(0.0, 0.1), (-0.3, 0.95)], 0.15, BLACK)  # back leg
    p.line([(0.12, -0.42), (0.42, -0.05)], 0.12, BLACK)
    p.line([(0.1, -0.42), (-0.22, -0.1)], 0.12, BLACK)


def _pedestrians(pen: _Pen) -> None:
    _walker(pen, 0, 0, 1)


def _children(pen: _Pen) -> None:
    _walker(pen, -0.4, 0.0, 0.95)
    _walker(pen, 0.45, 0.28, 0.66)


def _bicycle(pen: _Pen) -> None:
    for wx in (-0.55, 0.55):
        pen.ring(wx, 0.5, 0.36, 0.1, BLACK)
    frame = [(-0.55, 0.5), (-0.1, 0.5), (0.3, -0.05), (-0.3, -0.05), (-0.55, 0.5)]
    pen.line(frame, 0.08, BLACK)
    pen.line([(-0.1, 0.5), (-0.35, -0.2)], 0.08, BLACK)  # seat tube
    pen.line([(0.3, -0.05), (0.55, 0.5)], 0.08, BLACK)  # fork
    pen.line([(0.3, -0.05), (0.25, -0.35), (0.48, -0.38)], 0.08, BLACK)  # handlebar
    pen.disc(0.1, -0.85, 0.15, BLACK)  # rider
    pen.line([(-0.3, -0.25), (0.05, -0.65)], 0.2, BLACK)
    pen.line([(0.05, -0.6), (0.42, -0.4)], 0.1, BLACK)


def _snowflake(pen: _Pen) -> None:
    for a in (90, 150, 210, 270, 330, 30):  # symmetric about the vertical axis
        c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
        pen.line([(0, 0), (0.9 * c, 0.9 * s)], 0.11, BLACK)
        bx, by = 0.55 * c, 0.55 * s
        for turn in (-45, 45):
            t = math.radians(a + turn)
            pen.line([(bx, by), (bx + 0.3 * math.cos(t), by + 0.3 * math.sin(t))], 0.08, BLACK)


def _deer(pen: _Pen) -> None:
    """A stag leaping to the upper right."""
    pen.poly([(-0.6, 0.08), (0.3, -0.35), (0.45, -0.1), (-0.45, 0.35)], BLACK)  # body
    pen.line([(0.35, -0.25), (0.55, -0.62)], 0.16, BLACK)  # neck
    pen.poly([(0.48, -0.72), (0.92, -0.6), (0.56, -0.5)], BLACK)  # head
    pen.line([(0.52, -0.7), (0.42, -0.98)], 0.06, BLACK)  # antlers
    pen.line([(0.46, -0.86), (0.26, -0.94)], 0.06, BLACK)
    pen.line([(0.35, -0.15), (0.8, 0.05)], 0.09, BLACK)  # forelegs reaching forward
    pen.line([(0.3, -0.1), (0.65, 0.3)], 0.09, BLACK)
    pen.line([(-0.5, 0.22), (-0.92, 0.6)], 0.1, BLACK)  # hind legs pushing off
    pen.line([(-0.42, 0.3), (-0.68, 0.9)], 0.1, BLACK)
    pen.line([(-0.58, 0.1), (-0.78, -0.05)], 0.07, BLACK)  # tail


def _nothing(pen: _Pen) -> None:
    """No pictogram: the plate alone is the sign (no vehicles, yield)."""


def _stop(pen: _Pen) -> None:
    pen.text("STOP", 0, 0, 0.62, 1.95, WHITE)


# key -> (base shape, pictograms). Keys missing here are exact mirror images (see _MIRROR_DRAWINGS).
_DRAWINGS: dict[str, tuple[Callable[[_Pen], _Pen], tuple[Pictogram, ...]]] = {
    "speed_limit_20": (_prohibitory, (_number("20"),)),
    "speed_limit_30": (_prohibitory, (_number("30"),)),
    "speed_limit_50": (_prohibitory, (_number("50"),)),
    "speed_limit_60": (_prohibitory, (_number("60"),)),
    "speed_limit_70": (_prohibitory, (_number("70"),)),
    "speed_limit_80": (_prohibitory, (_number("80"),)),
    "end_speed_limit_80": (_end, (_number("80", GREY), _end_stripes)),
    "speed_limit_100": (_prohibitory, (_number("100"),)),
    "speed_limit_120": (_prohibitory, (_number("120"),)),
    "no_passing": (_prohibitory, (_no_passing(_car_rear, RED, BLACK),)),
    "no_passing_trucks": (_prohibitory, (_no_passing(_truck_rear, RED, BLACK),)),
    "right_of_way_next_intersection": (_danger, (_right_of_way,)),
    "priority_road": (_diamond, (_nothing,)),
    "yield": (_yield, (_nothing,)),
    "stop": (_octagon, (_stop,)),
    "no_vehicles": (_prohibitory, (_nothing,)),
    "no_trucks": (_prohibitory, (_truck_side,)),
    "no_entry": (_red_disc, (_no_entry_bar,)),
    "general_caution": (_danger, (_caution,)),
    "dangerous_curve_left": (_danger, (_curve_left,)),
    "double_curve": (_danger, (_double_curve,)),
    "bumpy_road": (_danger, (_bumpy,)),
    "slippery_road": (_danger, (_slippery,)),
    "road_narrows_right": (_danger, (_narrows_right,)),
    "road_work": (_danger, (_road_work,)),
    "traffic_signals": (_danger, (_signals,)),
    "pedestrians": (_danger, (_pedestrians,)),
    "children_crossing": (_danger, (_children,)),
    "bicycles_crossing": (_danger, (_bicycle,)),
    "ice_snow": (_danger, (_snowflake,)),
    "wild_animals": (_danger, (_deer,)),
    "end_all_limits": (_end, (_end_stripes,)),
    "turn_right_ahead": (_mandatory, (_turn_right,)),
    "ahead_only": (_mandatory, (_ahead,)),
    "straight_or_right": (_mandatory, (_straight_or_right,)),
    "keep_right": (_mandatory, (_keep_right,)),
    "roundabout": (_mandatory, (_roundabout,)),
    "end_no_passing": (_end, (_no_passing(_car_rear, GREY, GREY), _end_stripes)),
    "end_no_passing_trucks": (_end, (_no_passing(_truck_rear, GREY, GREY), _end_stripes)),
}
# Pictograms designed left-right symmetric. PIL's polygon filling rounds edges asymmetrically by up
# to one (supersampled) pixel, so these are averaged with their mirror image to be exactly symmetric.
_SYMMETRIC_DRAWINGS: frozenset[str] = frozenset({
    "right_of_way_next_intersection", "priority_road", "yield", "no_vehicles", "no_entry", "general_caution",
    "bumpy_road", "traffic_signals", "ice_snow", "ahead_only",
})
# Drawn as the exact horizontal mirror of another drawing, pixel for pixel.
_MIRROR_DRAWINGS: dict[str, str] = {
    "dangerous_curve_right": "dangerous_curve_left",
    "turn_left_ahead": "turn_right_ahead",
    "straight_or_left": "straight_or_right",
    "keep_left": "keep_right",
}


@functools.cache
def _template(label: int, px: int) -> np.ndarray:
    """Clean RGBA front view of class ``label``, ``px`` square, cached per process (read-only)."""
    key = _SPACE[label].key
    if key in _MIRROR_DRAWINGS:
        out = np.ascontiguousarray(_template(_SPACE.index(_MIRROR_DRAWINGS[key]), px)[:, ::-1])
    else:
        base, pictograms = _DRAWINGS[key]
        big = Image.new("RGBA", (px * _SUPERSAMPLE, px * _SUPERSAMPLE), (0, 0, 0, 0))
        frame = base(_Pen(ImageDraw.Draw(big), big, big.width))
        for draw in pictograms:
            draw(frame)
        if key in _SYMMETRIC_DRAWINGS:
            big = _symmetrised(big)
        out = np.asarray(big.resize((px, px), Image.LANCZOS), dtype=np.uint8)
    out.setflags(write=False)
    return out


def _symmetrised(img: Image.Image) -> Image.Image:
    """The mean of an RGBA image and its mirror (premultiplied, so transparent pixels add no colour)."""
    a = np.asarray(img, dtype=np.float32)
    a = np.concatenate([a[..., :3] * a[..., 3:] / 255, a[..., 3:]], axis=-1)
    a = (a + a[:, ::-1]) / 2
    rgb = a[..., :3] * 255 / np.maximum(a[..., 3:], 1e-6)
    return Image.fromarray(np.clip(np.concatenate([rgb, a[..., 3:]], axis=-1) + 0.5, 0, 255).astype(np.uint8))


def render_template(label: int, px: int = 64) -> np.ndarray:
    """Clean front view of class ``label`` as a ``px`` x ``px`` x 4 RGBA array (transparent outside)."""
    _SPACE.check_id(label, "render_template")
    return _template(int(label), int(px)).copy()


def render_clean(label: int, size: int) -> np.ndarray:
    """Front view of ``label`` filling a ``size`` square over plain grey: no warp, clutter or noise."""
    rgba = render_template(label, size).astype(np.float32)
    alpha = rgba[..., 3:] / 255.0
    out = rgba[..., :3] * alpha + np.asarray(CLEAN_BACKGROUND, np.float32) * (1 - alpha)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


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


def _weathered(label: int, px: int, rng: np.random.Generator) -> Image.Image:
    """The sign's own wear: brighter or darker than the scene, and faded towards grey."""
    gain = math.exp(rng.normal(0, 0.18))
    fade = rng.uniform(0, 0.2) ** 1.5
    table = np.clip(_LEVELS * gain * (1 - fade) + 150 * fade + 0.5, 0, 255).astype(np.uint8)
    template = _template(label, px)
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
    unit_per_px = 1 / (px / 2 * (1 - _MARGIN))  # template pixel (edge) coordinates -> sign unit coordinates
    shift = -px / 2 * unit_per_px
    from_template = np.array([[unit_per_px, 0, shift], [0, unit_per_px, shift], [0, 0, 1]])
    # Warp only the sign's box (PIL's bilinear warp costs per output pixel), then paste it there.
    x1, y1, x2, y2 = (max(0, min(w, v * w // size + d)) for v, d in zip(plan.roi, (-1, -1, 1, 1)))
    inverse = np.linalg.inv(to_canvas @ from_template) @ np.array([[1, 0, x1], [0, 1, y1], [0, 0, 1.0]])
    coeffs = tuple((inverse / inverse[2, 2]).reshape(-1)[:8].tolist())
    fx, fy, fw = to_canvas @ np.array([0.0, 0.9, 1.0])  # where a pole would leave the plate
    canvas = _background(rng, w, fx / fw, fy / fw)
    sign = _weathered(plan.label, px, rng)
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
                 classes: Sequence[int] | None = None, spec: str = "") -> None:
        _require(isinstance(n, int) and n >= 0, "n", n, "a non-negative integer")
        _require(isinstance(size, int) and 8 <= size <= 1024, "size", size, "an integer from 8 to 1024")
        _require(isinstance(seed, int) and seed >= 0, "seed", seed, "a non-negative integer")
        _require(isinstance(weather, (int, float)) and 0.0 <= weather <= 1.0, "weather", weather,
                 "a probability from 0 to 1")
        super().__init__(_SPACE, spec or f"synthetic:?n={n}&size={size}&seed={seed}&weather={weather}")
        self.n, self.size, self.seed, self.weather = n, size, seed, float(weather)
        self.conditions, weights = _condition_weights(conditions, self.weather)
        self._cumulative = np.cumsum(weights) / weights.sum() if len(weights) else weights
        self.classes = _class_ids(classes)

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
        return _Plan(label, condition, severity, h, _box(h, _SPACE[label].shape, self.size))

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.n:
            raise IndexError(f"synthetic sample {index} is outside 0..{self.n - 1}")
        return np.random.default_rng([self.seed, int(index)])

    def _sample(self, index: int, plan: _Plan, image: np.ndarray | None) -> Sample:
        return Sample(key=f"synthetic/{self.seed}/{index}", label=plan.label, image=image, source="synthetic",
                      track=f"synthetic-{self.seed}-{index}", roi=plan.roi, condition=plan.condition,
                      country=COUNTRY, meta={"severity": plan.severity})

    def read(self, index: int) -> Sample:
        rng = self._rng(index)
        plan = self._plan(rng)
        return self._sample(index, plan, _render(plan, self.size, rng))

    def entries(self) -> list[Sample]:
        return [self._sample(i, self._plan(self._rng(i)), None) for i in range(self.n)]

    def describe(self) -> dict:
        return {**super().describe(), "seed": self.seed, "image_size": self.size, "weather": self.weather,
                "conditions": list(self.conditions), "classes": list(self.classes)}


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


def _class_ids(classes: Sequence[int] | None) -> tuple[int, ...]:
    if classes is None:
        return tuple(range(len(_SPACE)))
    _require(len(classes) > 0, "classes", classes, "a non-empty list of class ids or keys")
    try:
        return tuple(_SPACE.check_id(c, "synthetic source option 'classes'") for c in classes)
    except (LabelError, TypeError, ValueError) as exc:
        raise SourceError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# The spec factory: options arrive as strings from ``synthetic:?n=2000&size=32&seed=0``


def open_synthetic(location: str, *, spec: str = "", n: str | int = "2000", size: str | int = "32",
                   seed: str | int = "0", weather: str | float = "0.3", conditions: str | None = None,
                   classes: str | None = None) -> SyntheticSource:
    """Open the synthetic source from spec options.

    ``conditions`` is a comma list of corruption kinds, optionally weighted (``snow:2,rain:1``);
    ``classes`` is a comma list of class ids or keys (``1,2,speed_limit_50``).
    """
    if location:
        raise SourceError(f"synthetic source takes no location, got {location!r}: write 'synthetic:?n=...'")
    return SyntheticSource(n=_parse(int, "n", n), size=_parse(int, "size", size),
                           seed=_parse(int, "seed", seed), weather=_parse(float, "weather", weather),
                           conditions=_parse_conditions(conditions), classes=_parse_classes(classes),
                           spec=spec)


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
            ids.append(int(item) if item.lstrip("-").isdigit() else _SPACE.index(item))
        except LabelError as exc:
            raise SourceError(f"synthetic source: option 'classes': {exc}") from None
    return ids
