"""Each class's sign as a clean template: plate, border and pictogram drawn in unit coordinates and
antialiased by supersampling; mirror pairs drawn as exact mirrors, symmetric signs exactly
symmetric, so flip rules hold pixel for pixel in what the synthetic source and the scenes render.

A meaning can be drawn in more than one national **design** (:data:`DESIGNS`): ``de`` is the German
sign GTSRB shows; ``cn`` the Chinese one where it differs in ways a German-trained model stumbles on
(docs/countries.md): warning triangles yellow with a black border, no overtaking as two arrows
under a red bar, speed-limit digits taller and narrower. A meaning without a design of its own in a
country is drawn in the German one."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from signscale.labels import LabelSpace

COUNTRY = "de"


DESIGNS: tuple[str, ...] = ("de", "cn")  # the first is the default and the fallback


SPACE = LabelSpace.for_country(COUNTRY)


RGB = tuple[int, int, int]


RED: RGB = (200, 28, 40)


BLUE: RGB = (18, 82, 168)


WHITE: RGB = (244, 244, 238)


BLACK: RGB = (24, 24, 26)


YELLOW: RGB = (250, 186, 20)


GREY: RGB = (135, 135, 135)


GREEN: RGB = (26, 156, 74)


CLEAN_BACKGROUND: RGB = (128, 128, 128)


MARGIN = 0.04  # share of the template left transparent so antialiased edges are never clipped


_SUPERSAMPLE = 4  # templates are drawn 4x larger and reduced: cheap antialiasing for PIL's drawing


Point = tuple[float, float]


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
        self.unit = px / 2 * (1 - MARGIN)

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


def _danger_cn(pen: _Pen) -> _Pen:
    """China's warning triangle (GB 5768): yellow plate, a broad black border inside a thin yellow rim."""
    centroid = (0.0, _SQRT3_2 / 3)
    pen.poly(TRIANGLE, YELLOW)
    pen.poly(_scaled(TRIANGLE, centroid, 0.94), BLACK)
    pen.poly(_scaled(TRIANGLE, centroid, 0.8), YELLOW)
    return pen.sub(0, 0.22, 0.46)


def _prohibitory_cn(pen: _Pen) -> _Pen:
    """China's prohibitory disc: a thinner red ring than the German one, so the pictogram is larger."""
    pen.disc(0, 0, 1.0, WHITE)
    pen.disc(0, 0, 0.95, RED)
    pen.disc(0, 0, 0.8, WHITE)
    return pen.sub(0, 0, 0.68)


Pictogram = Callable[[_Pen], None]


def _number(text: str, colour: RGB = BLACK) -> Pictogram:
    return lambda pen: pen.text(text, 0, 0, 1.15, 1.9, colour)


def _number_cn(text: str) -> Pictogram:
    """Chinese limit digits: taller and narrower than the German ones, nearly filling the ring."""
    return lambda pen: pen.text(text, 0, 0, 1.3, 1.45 if len(text) < 3 else 1.75, BLACK)


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


def _no_passing_cn(pen: _Pen) -> None:
    """China's no overtaking (TT100K p1): a straight arrow and one swerving past it, under a red bar."""
    _arrow(pen, [(0.55, 0.95), (0.55, -0.15)], 0.2, BLACK, head=0.4, head_width=0.58)
    swerve = [(-0.05, 1.0), (-0.5, 0.6), (-0.5, 0.05), (0.2, -0.55), (0.2, -1.0)]
    _arrow(pen, swerve, 0.2, BLACK, head=0.4, head_width=0.58)
    pen.line([(0.1, -1.13), (-0.1, 1.13)], 0.2, RED, caps=False)  # ends inside the ring's white


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


def _pedestrians_cn(pen: _Pen) -> None:
    """China's pedestrian warning: the walker above the slanted bars of a zebra crossing."""
    _walker(pen, 0.05, -0.2, 0.78)
    for x in np.linspace(-0.75, 0.75, 5):
        pen.poly([(x - 0.08, 0.98), (x + 0.1, 0.98), (x + 0.22, 0.74), (x + 0.04, 0.74)], BLACK)


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


# Designs other than the German one, by meaning: a full drawing, or None for "the German pictogram
# on this country's plate" where only the plate differs (the warning triangles).
_SPEED_LIMITS = ("20", "30", "50", "60", "70", "80", "100", "120")
_DESIGN_DRAWINGS: dict[str, dict[str, tuple[Callable[[_Pen], _Pen], tuple[Pictogram, ...]]]] = {
    "cn": {
        **{f"speed_limit_{v}": (_prohibitory_cn, (_number_cn(v),)) for v in _SPEED_LIMITS},
        "no_passing": (_prohibitory_cn, (_no_passing_cn,)),
        "pedestrians": (_danger_cn, (_pedestrians_cn,)),
        **{key: (_danger_cn, pictograms) for key, (base, pictograms) in _DRAWINGS.items()
           if base is _danger and key != "pedestrians"},
    },
}


def design_of(key: str, design: str) -> str:
    """The design a meaning is actually drawn in: ``design`` where it has a drawing there, else German."""
    if design not in DESIGNS:
        raise ValueError(f"unknown sign design {design!r}: choose from {', '.join(DESIGNS)}")
    key = _MIRROR_DRAWINGS.get(key, key)
    return design if key in _DESIGN_DRAWINGS.get(design, {}) else DESIGNS[0]


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
def sign_template(label: int, px: int, design: str = "de") -> np.ndarray:
    """Clean RGBA front view of class ``label`` in ``design``, ``px`` square, cached per process (read-only)."""
    key = SPACE[label].key
    design = design_of(key, design)
    if key in _MIRROR_DRAWINGS:
        out = np.ascontiguousarray(sign_template(SPACE.index(_MIRROR_DRAWINGS[key]), px, design)[:, ::-1])
    else:
        base, pictograms = _DESIGN_DRAWINGS[design][key] if design != DESIGNS[0] else _DRAWINGS[key]
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


def render_template(label: int, px: int = 64, design: str = "de") -> np.ndarray:
    """Clean front view of class ``label`` as a ``px`` x ``px`` x 4 RGBA array (transparent outside)."""
    SPACE.check_id(label, "render_template")
    return sign_template(int(label), int(px), design).copy()


def render_clean(label: int, size: int, design: str = "de") -> np.ndarray:
    """Front view of ``label`` filling a ``size`` square over plain grey: no warp, clutter or noise."""
    rgba = render_template(label, size, design).astype(np.float32)
    alpha = rgba[..., 3:] / 255.0
    out = rgba[..., :3] * alpha + np.asarray(CLEAN_BACKGROUND, np.float32) * (1 - alpha)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
