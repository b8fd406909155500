"""Compiled CPU kernels for the loader's hot path (numba).

A DataLoader worker augmenting 32 px crops with eager torch ops pays a full read and write of the
batch for every step (uint8 -> float, colour matrix, sampling grid, ``grid_sample``, clamp,
rounding), plus each op's fixed cost, and at 32 px those costs, not the arithmetic, are the
batch. :func:`augment` does the same work in one pass per image: it reads the 8-bit crop once,
derives the sampling and colour matrices from the caller's draws, resamples, colours, applies the
occasional blur, occluder or weather condition, and rounds into the 8-bit output. For a batch of
256 that is 1.8 ms against 4.6-5.0 ms for the torch ops (the whole loader worker: 61k against
33k samples per CPU-second, side by side in ``signscale bench io``). :class:`signscale.training.augment.BatchAugment`
uses it on the CPU when numba is importable, and keeps its torch path for GPUs and as the
reference ``tests/test_kernels.py`` holds the kernel to. :func:`permute` is the compiled twin of
:func:`signscale.data.permutation.permute`.

The per-image loops run over the whole image (a loop per 32-pixel row costs three times as much:
its set-up is paid per row) and are compiled per image size, so LLVM sees constant trip counts.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

BORDER, REFLECTION, ZEROS = 0, 1, 2
PADDING_CODES = {"border": BORDER, "reflection": REFLECTION, "zeros": ZEROS}
# What happens to an image after colour and geometry (augment's ``code``)
PLAIN, BLUR, ERASE = 0, 1, 2
# weather kinds, as signscale.transforms (and signscale.corruptions) name them
WEATHER = {"fog": 3, "night": 4, "noise": 5, "contrast": 6, "snow": 7}
FOG, NIGHT, NOISE, CONTRAST, SNOW = WEATHER.values()


# The per-sample parameters the kernel reads from the caller's draw matrix, in this order; the
# caller passes the column of each (Setup.columns), so its layout stays its own.
PARAMETERS = ("rotate", "zoom", "shift_x", "shift_y", "tilt_x", "tilt_y", "brightness", "contrast", "saturation",
              "blur_level", "severity", "fog_grey", "erase_area", "erase_log_aspect", "erase_y", "erase_x",
              "erase_r", "erase_g", "erase_b", "hue", "cast_r", "cast_g", "cast_b")
(_ROT, _ZOOM, _SX, _SY, _TX, _TY, _BRIGHT, _CONTRAST, _SAT, _BLUR, _SEVERITY, _GREY, _EAREA, _EASPECT, _EY, _EX,
 _ER, _EG, _EB, _HUE, _CR, _CG, _CB) = range(len(PARAMETERS))


@dataclass(frozen=True)
class Setup:
    """What stays the same from batch to batch for one augmentation config and image size.

    ``columns`` int64: where each of :data:`PARAMETERS` sits in a row of draws. ``luma`` float32 [3]:
    the weights of the mean luma that contrast pulls towards. ``fill`` float32 [3]: what ``zeros``
    padding shows, in pixel units. ``blur_taps`` float32 [levels, 2r + 1]: the blur bank (reflecting
    at the border). ``weather`` float32 [5 kinds, severities, 5]: each kind's severity table, kinds
    in :data:`WEATHER` order. Fog's 4x4 patch grid is upsampled by ``fog_rows`` [H, 4] and
    ``fog_cols`` [W, 4]; snow flakes are ``snow_sizes`` (small, large) pixels, softened by the
    ``soften`` taps if there are any.
    """

    columns: np.ndarray
    projective: bool
    padding: str
    luma: np.ndarray
    fill: np.ndarray
    blur_taps: np.ndarray
    weather: np.ndarray
    max_severity: int
    fog_rows: np.ndarray
    fog_cols: np.ndarray
    snow_sizes: np.ndarray
    soften: np.ndarray


# "contract" allows fused multiply-adds; no reassociation and no approximate reciprocals, so a flip
# stays an exact mirror and the kernel agrees with grid_sample to float rounding. Compiled on first
# use and then cached on disk by numba.
_jit = numba.njit(cache=True, nogil=True, fastmath={"nnan", "ninf", "nsz", "contract"}, boundscheck=False,
                  error_model="numpy")


def augment(src: np.ndarray, out: np.ndarray, setup: Setup, params: np.ndarray, flip: np.ndarray,
            code: np.ndarray, draws: np.ndarray, draw_at: np.ndarray) -> None:
    """Resample, colour, then blur, occlude or weather each uint8 [B, H, W, 3] image, rounding into
    ``out`` (uint8 [B, 3, H, W]), in one pass per image.

    ``params`` float32 [B, ...]: each image's draws (see :class:`Setup`); ``flip`` bool [B];
    ``code`` int32 [B]: PLAIN, BLUR, ERASE or a :data:`WEATHER` kind; the weather's random numbers,
    drawn by the caller in the torch path's order, start at ``draws[draw_at[b]]``: fog's 4x4 patch
    grid, night's and noise's [3, H, W] normal noise, snow's [H, W] uniform seeds.
    """
    u = setup
    _kernel(src.shape[1], src.shape[2])(
        np.ascontiguousarray(src), out, np.ascontiguousarray(params, np.float32), u.columns,
        flip.astype(np.bool_, copy=False), code.astype(np.int32, copy=False), u.projective, PADDING_CODES[u.padding],
        u.luma, u.fill, u.blur_taps, u.weather, u.max_severity, draws, draw_at, u.fog_rows, u.fog_cols, u.snow_sizes,
        u.soften)


def _plain_setup(h: int, w: int, padding: str = "border") -> Setup:
    """A setup with no effects (blur bank, weather tables and fog grids of the right shapes)."""
    z = np.zeros
    return Setup(columns=np.arange(len(PARAMETERS), dtype=np.int64), projective=False, padding=padding,
                 luma=np.array([0.299, 0.587, 0.114], np.float32), fill=z(3, np.float32),
                 blur_taps=np.ones((1, 1), np.float32), weather=z((5, 5, 5), np.float32), max_severity=1,
                 fog_rows=z((h, 4), np.float32), fog_cols=z((w, 4), np.float32), snow_sizes=np.ones(2, np.int64),
                 soften=z(0, np.float32))


@functools.cache
def warm(h: int | None = None, w: int | None = None) -> None:
    """Compile the shuffle kernel and, given a size, the augmentation kernel for h x w images (or load
    them from numba's disk cache) before DataLoader workers fork: they inherit the machine code
    instead of each paying a fifth of a second to load it, every epoch (workers are re-created
    each epoch)."""
    permute(np.zeros(1, np.int64), 2, np.zeros(1, np.uint64), 2, 4)
    if h is None:
        return
    w = h if w is None else w
    params = np.zeros((1, len(PARAMETERS)), np.float32)
    params[0, _ZOOM] = params[0, _BRIGHT] = params[0, _CONTRAST] = params[0, _SAT] = 1.0
    params[0, _CR] = params[0, _CG] = params[0, _CB] = 1.0
    augment(np.zeros((1, h, w, 3), np.uint8), np.empty((1, 3, h, w), np.uint8), _plain_setup(h, w), params,
            np.zeros(1, np.bool_), np.zeros(1, np.int32), np.zeros(0, np.float32), np.zeros(1, np.int64))


@functools.cache
def _kernel(H: int, W: int) -> Any:
    """The kernel compiled for one image size. With H and W constants, LLVM unrolls and vectorises
    the per-image loops: the blur ran 2.7x faster than with sizes known only at run time. Numba
    caches each size's machine code on disk (about 5 s to compile a new size, 0.2 s to load it)."""

    @_jit
    def _augment(src, out, params, cols, flip, code, projective, mode, luma, fill, blur_taps, weather, max_severity,
                 draws, draw_at, fog_rows, fog_cols, snow_sizes, soften):  # pragma: no cover
        B = src.shape[0]
        HW = H * W
        # Each image is read into float planes with a one-pixel ring around it (and a row's slack after
        # it): a tap just outside the image then reads the ring, which holds what ``zeros`` padding shows
        # and is never weighted otherwise, so no pixel needs a bounds test.
        P = W + 2
        plane = np.zeros((3, (H + 2) * P + P + 1), np.float32)
        taps = np.empty(HW, np.int32)
        fxs = np.empty(HW, np.float32)
        fys = np.empty(HW, np.float32)
        rgb = np.empty((3, HW), np.float32)
        done = np.empty((3, HW), np.float32)
        tmp = np.empty((3, HW), np.float32)
        xs, ys = _pixel_centres(H, W)
        eye = np.eye(3, dtype=np.float32)
        m = np.empty((3, 3), np.float32)
        lighting = np.empty((3, 3), np.float32)
        style = np.empty((3, 3), np.float32)
        weights = np.empty(3, np.float32)
        sampling = np.empty((3, 3), np.float32)
        zero, unit = np.float32(0.0), np.float32(1.0)
        for b in range(B):
            q = params[b]
            _style_matrix(q[cols[_HUE]], q[cols[_CR]], q[cols[_CG]], q[cols[_CB]], style)
            for j in range(3):  # the luma weights of the re-coloured image: luma @ style
                weights[j] = luma[0] * style[0, j] + luma[1] * style[1, j] + luma[2] * style[2, j]
            mean_luma = _load(src[b].reshape(HW * 3), plane, W, H, weights)
            c = _colour_matrix(q[cols[_BRIGHT]], q[cols[_CONTRAST]], q[cols[_SAT]], luma, lighting) * mean_luma
            for i in range(3):  # m = lighting @ style
                for j in range(3):
                    m[i, j] = lighting[i, 0] * style[0, j] + lighting[i, 1] * style[1, j] + lighting[i, 2] * style[2, j]
            if mode == ZEROS:
                _ring(plane, W, H, _fill_source(m, c, fill))
            _sampling_matrix(q, cols, flip[b], projective, H, W, sampling)
            _sampling(sampling, xs, ys, W, H, mode, taps, fxs, fys)
            _bilinear(plane, taps, fxs, fys, P, rgb)
            effect = code[b]
            if effect == PLAIN:
                _round(rgb, m, c, unit, out[b].reshape(3, HW))
                continue
            _colour(rgb, m, c, done)
            if effect == BLUR:
                _blur(done, tmp, blur_taps[np.int64(q[cols[_BLUR]])], H, W)
            elif effect == ERASE:
                _erase(done, q, cols, H, W)
            else:  # weather, on [0, 1] pixels
                for ch in range(3):
                    for k in range(HW):
                        done[ch, k] = min(max(done[ch, k] * np.float32(1 / 255), zero), unit)
                level = min(np.int64(q[cols[_SEVERITY]]), max_severity - 1)
                _weather(done, effect, weather[effect - FOG, level], q[cols[_GREY]], draws[draw_at[b]:], fog_rows,
                         fog_cols, snow_sizes, soften, H, W, tmp)
                _round(done, eye, zero, np.float32(255.0), out[b].reshape(3, HW))
                continue
            _round(done, eye, zero, unit, out[b].reshape(3, HW))

    return _augment


@_jit
def _colour_matrix(brightness, contrast, saturation, luma, m):  # pragma: no cover
    """Brightness, contrast (towards the mean luma) and saturation (towards each pixel's luma) as
    ``m @ x + shift * mean_luma``, as training.colour.lighting_matrices: fills ``m``, returns ``shift``."""
    cb = contrast * brightness
    for i in range(3):
        for j in range(3):
            m[i, j] = (saturation * cb if i == j else np.float32(0.0)) + (np.float32(1.0) - saturation) * cb * luma[j]
    return brightness - cb


@_jit
def _style_matrix(hue, gain_r, gain_g, gain_b, out):  # pragma: no cover
    """The re-colouring of the design, as training.colour.style_matrices: a rotation of ``hue``
    radians about the grey axis, then a gain per channel (the identity for hue 0 and gains 1)."""
    cos, sin = np.cos(hue), np.sin(hue)
    third = (np.float32(1.0) - cos) / np.float32(3.0)
    k = sin * np.float32(0.57735026)  # sin / sqrt(3)
    diagonal = cos + third
    out[0, 0], out[0, 1], out[0, 2] = gain_r * diagonal, gain_r * (third - k), gain_r * (third + k)
    out[1, 0], out[1, 1], out[1, 2] = gain_g * (third + k), gain_g * diagonal, gain_g * (third - k)
    out[2, 0], out[2, 1], out[2, 2] = gain_b * (third - k), gain_b * (third + k), gain_b * diagonal


@_jit
def _sampling_matrix(q, cols, flip, projective, H, W, out):  # pragma: no cover
    """Output -> input in grid_sample's [-1, 1] space, as training.geometry.sampling_matrices: the inverse
    of flip, zoom, rotate, shift, then tilt."""
    zoom = q[cols[_ZOOM]]
    cos, sin = np.cos(q[cols[_ROT]]) / zoom, np.sin(q[cols[_ROT]]) / zoom
    mirror = np.float32(-1.0) if flip else np.float32(1.0)
    a00, a01 = mirror * cos, mirror * sin * np.float32(H / W)
    a10, a11 = -sin * np.float32(W / H), cos
    sx, sy = q[cols[_SX]], q[cols[_SY]]
    b0, b1 = -(a00 * sx + a01 * sy), -(a10 * sx + a11 * sy)
    tx = q[cols[_TX]] if projective else np.float32(0.0)
    ty = q[cols[_TY]] if projective else np.float32(0.0)
    out[0, 0], out[0, 1], out[0, 2] = a00 - b0 * tx, a01 - b0 * ty, b0
    out[1, 0], out[1, 1], out[1, 2] = a10 - b1 * tx, a11 - b1 * ty, b1
    out[2, 0], out[2, 1], out[2, 2] = -tx, -ty, np.float32(1.0)


@_jit
def _bilinear(plane, taps, fxs, fys, P, rgb):  # pragma: no cover
    q0, q1, q2 = plane[0], plane[1], plane[2]
    r0, r1, r2 = rgb[0], rgb[1], rgb[2]
    for k in range(taps.shape[0]):
        t, fx, fy = taps[k], fxs[k], fys[k]
        a, b, c, d = q0[t], q0[t + 1], q0[t + P], q0[t + P + 1]
        top = a + fx * (b - a)
        r0[k] = top + fy * (c + fx * (d - c) - top)
        a, b, c, d = q1[t], q1[t + 1], q1[t + P], q1[t + P + 1]
        top = a + fx * (b - a)
        r1[k] = top + fy * (c + fx * (d - c) - top)
        a, b, c, d = q2[t], q2[t + 1], q2[t + P], q2[t + P + 1]
        top = a + fx * (b - a)
        r2[k] = top + fy * (c + fx * (d - c) - top)


@_jit
def _round(rgb, m, c, gain, out):  # pragma: no cover
    """``(m @ rgb + c) * gain``, clamped to [0, 255] and rounded half up into uint8 planes."""
    lo, hi = np.float32(0.5), np.float32(255.5)
    for ch in range(3):
        m0, m1, m2 = m[ch, 0] * gain, m[ch, 1] * gain, m[ch, 2] * gain
        offset = c * gain + np.float32(0.5)
        o = out[ch]
        for k in range(rgb.shape[1]):
            v = m0 * rgb[0, k] + m1 * rgb[1, k] + m2 * rgb[2, k] + offset
            o[k] = np.uint8(np.int32(min(max(v, lo), hi)))


@_jit
def _colour(rgb, m, c, out):  # pragma: no cover
    """``m @ rgb + c`` into float planes."""
    for ch in range(3):
        m0, m1, m2 = m[ch, 0], m[ch, 1], m[ch, 2]
        o = out[ch]
        for k in range(rgb.shape[1]):
            o[k] = m0 * rgb[0, k] + m1 * rgb[1, k] + m2 * rgb[2, k] + c


@_jit
def _blur(x, tmp, weights, H, W):  # pragma: no cover
    """Separable blur of float planes [3, H * W] in place (see :func:`_blur_plane`)."""
    for ch in range(3):
        _blur_plane(x[ch], tmp[ch], weights, H, W)


@_jit
def _blur_plane(plane, tmp, weights, H, W):  # pragma: no cover
    """Separable blur of one float plane [H * W] in place, reflecting at the border (as
    transforms._blur_matrix folds it in): along columns, then, through a transpose, along rows.
    Both passes are the same flat loop over the whole plane, which vectorises (a loop per 32-pixel
    row did not, and cost four times as much)."""
    _blur_columns(plane, tmp, weights, H, W)
    _transpose(tmp, plane, H, W)
    _blur_columns(plane, tmp, weights, W, H)
    _transpose(tmp, plane, W, H)


@_jit
def _blur_columns(src, dst, weights, H, W):  # pragma: no cover
    """``dst`` = ``src`` [H, W] blurred along each column (reflecting at the top and bottom)."""
    r = weights.shape[0] // 2
    padded = np.empty((H + 2 * r) * W, np.float32)
    for k in range(H * W):
        padded[r * W + k] = src[k]
    for t in range(1, r + 1):
        for j in range(W):
            padded[(r - t) * W + j] = src[t * W + j]
            padded[(r + H - 1 + t) * W + j] = src[(H - 1 - t) * W + j]
    for k in range(H * W):
        dst[k] = weights[0] * padded[k]
    for t in range(1, 2 * r + 1):
        wt = weights[t]
        for k in range(H * W):
            dst[k] += wt * padded[k + t * W]


@_jit
def _transpose(src, dst, H, W):  # pragma: no cover
    """``dst`` [W, H] = ``src`` [H, W] transposed."""
    for i in range(H):
        for j in range(W):
            dst[j * H + i] = src[i * W + j]


@_jit
def _erase(x, q, cols, H, W):  # pragma: no cover
    """An occluding rectangle of the drawn area, aspect, centre and colour, as transforms._erase."""
    root = np.sqrt(q[cols[_EAREA]])
    half_h = np.exp(q[cols[_EASPECT]] * np.float32(0.5)) * root * np.float32(H / 2)
    half_w = np.exp(q[cols[_EASPECT]] * np.float32(-0.5)) * root * np.float32(W / 2)
    cy, cx = q[cols[_EY]], q[cols[_EX]]
    rgb = (q[cols[_ER]] * np.float32(255.0), q[cols[_EG]] * np.float32(255.0), q[cols[_EB]] * np.float32(255.0))
    for i in range(H):
        if abs(np.float32(i) + np.float32(0.5) - cy) < half_h:
            for j in range(W):
                if abs(np.float32(j) + np.float32(0.5) - cx) < half_w:
                    for ch in range(3):
                        x[ch, i * W + j] = rgb[ch]


def permute(x: np.ndarray, n: int, seeds: np.ndarray, bits: int, rounds: int) -> np.ndarray:
    """:func:`signscale.data.permutation.permute` compiled: the same bijection, one element at a time (the
    vectorised numpy original pays ~40 array ops per call, a quarter of a millisecond per batch)."""
    out = np.empty(x.shape, np.uint64)
    _feistel(np.ascontiguousarray(x, np.uint64).reshape(-1), np.uint64(n),
             np.ascontiguousarray(np.broadcast_to(np.asarray(seeds, np.uint64), x.shape)).reshape(-1),
             np.uint64(bits // 2), rounds, out.reshape(-1))
    return out


@_jit
def _feistel(x, n, seeds, half, rounds, out):  # pragma: no cover
    mask = (np.uint64(1) << half) - np.uint64(1)
    golden, step = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9)
    m1, m2 = np.uint64(0x85EBCA6B), np.uint64(0xC2B2AE35)
    keys = np.empty(rounds, np.uint64)
    for i in range(x.shape[0]):
        mixed = seeds[i] * golden
        for r in range(rounds):
            keys[r] = (mixed ^ (np.uint64(r + 1) * step)) >> np.uint64(32)
        v = x[i]
        while True:  # cycle-walk until the value is back in [0, n)
            left, right = v >> half, v & mask
            for r in range(rounds):
                f = ((right * m1 + keys[r]) ^ (right >> np.uint64(3))) * m2
                left, right = right, (left ^ (f >> np.uint64(7))) & mask
            v = (left << half) | right
            if v < n:
                break
        out[i] = v


@_jit
def _weather(x, kind, t, value, draws, fog_rows, fog_cols, snow_sizes, soften, H, W, tmp):  # pragma: no cover
    """One weather condition in place on [0, 1] planes [3, H * W]: transforms' torch effects of the
    same names, with the same tables (``t``: the severity's row) and the same random numbers."""
    HW = H * W
    if kind == FOG:  # towards a light grey, thicker at the top and in uneven patches
        rows = np.zeros((H, 4), np.float32)  # (fog_rows @ patches), then @ fog_cols.T: torch's order
        for i in range(H):
            for u in range(4):
                for v in range(4):
                    rows[i, v] += fog_rows[i, u] * (draws[4 * u + v] * np.float32(0.5) + np.float32(0.75))
        for i in range(H):
            for j in range(W):
                a = rows[i, 0] * fog_cols[j, 0] + rows[i, 1] * fog_cols[j, 1] + rows[i, 2] * fog_cols[j, 2] \
                    + rows[i, 3] * fog_cols[j, 3]
                a = min(max(a * t[0], np.float32(0.0)), np.float32(0.92))
                for ch in range(3):
                    x[ch, i * W + j] += (value - x[ch, i * W + j]) * a
    elif kind == NIGHT:  # gamma darkening, a blue cast, sensor noise
        for ch in range(3):
            for k in range(HW):
                x[ch, k] = x[ch, k] ** t[0] * t[2 + ch] + draws[ch * HW + k] * t[1]
    elif kind == NOISE:
        for ch in range(3):
            for k in range(HW):
                x[ch, k] += draws[ch * HW + k] * t[0]
    elif kind == CONTRAST:  # towards the image mean
        mean = np.float32(0.0)
        for ch in range(3):
            for k in range(HW):
                mean += x[ch, k]
        mean /= np.float32(3 * HW)
        for ch in range(3):
            for k in range(HW):
                x[ch, k] += (mean - x[ch, k]) * t[0]
    elif kind == SNOW:  # whitened, with flakes grown from seeds
        _snow(x, t, draws, snow_sizes, soften, H, W, tmp)


@_jit
def _snow(x, t, draws, snow_sizes, soften, H, W, tmp):  # pragma: no cover
    HW = H * W
    density = t[1]
    seeds = tmp[0]
    for k in range(HW):
        u = draws[k]
        seeds[k] = (u / density * np.float32(0.4) + np.float32(0.6)) if u < density else np.float32(0.0)
    size = snow_sizes[1] if t[2] > 0 else snow_sizes[0]
    flakes = tmp[1]
    for i in range(H):  # each seed becomes a size x size flake below and right of it
        for j in range(W):
            f = np.float32(0.0)
            for a in range(min(size, i + 1)):
                for b in range(min(size, j + 1)):
                    f = max(f, seeds[(i - a) * W + j - b])
            flakes[i * W + j] = f
    if soften.shape[0]:
        _blur_plane(flakes, tmp[2], soften, H, W)
    for ch in range(3):
        for k in range(HW):
            x[ch, k] += (np.float32(0.85) - x[ch, k]) * t[0]
            x[ch, k] += (np.float32(0.97) - x[ch, k]) * min(flakes[k] * np.float32(1.3), np.float32(1.0))


@_jit
def _pixel_centres(H, W):  # pragma: no cover
    """Each output pixel's centre in [-1, 1], as grid_sample sees it, flat over the image."""
    xs = np.empty(H * W, np.float32)
    ys = np.empty(H * W, np.float32)
    for i in range(H):
        for j in range(W):
            xs[i * W + j] = (np.float32(2 * j + 1) - np.float32(W)) / np.float32(W)
            ys[i * W + j] = (np.float32(2 * i + 1) - np.float32(H)) / np.float32(H)
    return xs, ys


@_jit
def _load(flat, plane, W, H, luma):  # pragma: no cover
    """Interleaved uint8 pixels -> the inside of the ringed float planes; returns the mean luma."""
    P = W + 2
    s0, s1, s2 = 0, 0, 0
    for i in range(H):
        row = (i + 1) * P + 1
        for j in range(W):
            k = 3 * (i * W + j)
            a0, a1, a2 = np.int32(flat[k]), np.int32(flat[k + 1]), np.int32(flat[k + 2])
            plane[0, row + j], plane[1, row + j], plane[2, row + j] = a0, a1, a2
            s0, s1, s2 = s0 + a0, s1 + a1, s2 + a2
    return (luma[0] * np.float32(s0) + luma[1] * np.float32(s1) + luma[2] * np.float32(s2)) / np.float32(H * W)


@_jit
def _fill_source(m, c, fill):  # pragma: no cover
    """The colour x with ``m @ x + c == fill``: what the ring must hold so that, once coloured, a tap
    outside the image shows ``fill`` (m is invertible: saturation is never 0 with this padding, and the
    style's gains are positive)."""
    a, b_, c_ = m[0, 0], m[0, 1], m[0, 2]
    d, e, f = m[1, 0], m[1, 1], m[1, 2]
    g, h, i = m[2, 0], m[2, 1], m[2, 2]
    A, B, C = e * i - f * h, -(d * i - f * g), d * h - e * g
    det = a * A + b_ * B + c_ * C
    y0, y1, y2 = fill[0] - c, fill[1] - c, fill[2] - c
    x0 = (A * y0 + (c_ * h - b_ * i) * y1 + (b_ * f - c_ * e) * y2) / det
    x1 = (B * y0 + (a * i - c_ * g) * y1 + (c_ * d - a * f) * y2) / det
    x2 = (C * y0 + (b_ * g - a * h) * y1 + (a * e - b_ * d) * y2) / det
    return np.float32(x0), np.float32(x1), np.float32(x2)


@_jit
def _ring(plane, W, H, values):  # pragma: no cover
    P = W + 2
    for ch in range(3):
        v = values[ch]
        for j in range(P):
            plane[ch, j] = v
            plane[ch, (H + 1) * P + j] = v
        for i in range(1, H + 1):
            plane[ch, i * P] = v
            plane[ch, i * P + W + 1] = v


@_jit
def _sampling(m, xs, ys, W, H, mode, taps, fxs, fys):  # pragma: no cover
    """Per output pixel: the top-left tap (a flat index into the ringed planes) and the fractions.

    ``border`` clamps the coordinate to the image and ``reflection`` mirrors it first, as
    grid_sample does; ``zeros`` clamps it to the ring, whose value then blends in. (``fxs`` and
    ``fys`` hold the coordinates until the last loop; each loop is branch-free, so it vectorises.)
    """
    one, half = np.float32(1.0), np.float32(0.5)
    Wf, Hf = np.float32(W), np.float32(H)
    m00, m01, m02 = m[0, 0], m[0, 1], m[0, 2]
    m10, m11, m12 = m[1, 0], m[1, 1], m[1, 2]
    m20, m21, m22 = m[2, 0], m[2, 1], m[2, 2]
    n = xs.shape[0]
    for k in range(n):
        x, y = xs[k], ys[k]
        d = m20 * x + m21 * y + m22  # exactly 1 for an affine map, so the division changes nothing
        fxs[k] = (((m00 * x + m01 * y + m02) / d + one) * Wf - one) * half
        fys[k] = (((m10 * x + m11 * y + m12) / d + one) * Hf - one) * half
    if mode == REFLECTION:
        for k in range(n):
            fxs[k], fys[k] = _reflect(fxs[k], Wf), _reflect(fys[k], Hf)
    inset = np.float32(0.0) if mode == ZEROS else one  # (+1: ring coordinates)
    x_lo, x_hi = inset, Wf + one - inset
    y_lo, y_hi = inset, Hf + one - inset
    P = W + 2
    for k in range(n):
        ix = min(max(fxs[k] + one, x_lo), x_hi)  # >= 0, so truncation is floor
        iy = min(max(fys[k] + one, y_lo), y_hi)
        x0, y0 = np.int32(ix), np.int32(iy)
        fxs[k], fys[k] = ix - np.float32(x0), iy - np.float32(y0)
        taps[k] = y0 * P + x0


@_jit
def _reflect(v, size):  # pragma: no cover
    """grid_sample's reflection for align_corners=False: mirror about -0.5 and size - 0.5."""
    half = np.float32(0.5)
    t = abs(v + half)
    flips = np.floor(t / size)
    extra = t - flips * size
    if np.int32(flips) % 2 == 0:
        return extra - half
    return size - extra - half
