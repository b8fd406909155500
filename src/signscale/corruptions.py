"""Weather, sensor and camera-fault corruptions of sign images.

Two families: the weather and sensor conditions ``snow, rain, fog, night, glare, blur, noise,
contrast`` (:data:`CORRUPTIONS`), which are also the condition names a dataset records (so this tuple
cannot grow without changing every packed dataset's condition table and the synthetic renderer's
draws), and the faults of a real dashcam ``jpeg, motion_blur, low_light, defocus, lens_rain``
(:data:`CAMERA_FAULTS`), which evaluation applies and training only when asked (``--augment.camera``,
signscale.training.camera). :data:`KINDS` is both, in a fixed order
(new kinds are appended, so an existing kind's seed in a robustness report never changes).

One implementation serves three users: the synthetic renderer (to tag samples with a condition),
training augmentation, and robustness evaluation (accuracy per condition and severity). Sharing it
means a model is evaluated on exactly the corruptions it may have been trained with, and the
report can say so.

Every corruption is pure numpy on a float32 NxHxWx3 batch in [0, 1], draws all randomness from
the caller's ``np.random.Generator`` (same generator state -> same pixels, in any process) and
scales its spatial parameters with the image size, so severity 3 looks alike on a sign crop at 32
and at 128 px. A road scene is not a sign crop: scaled by its 512 px width, a severity-3 blur would be
sixteen times wider than on the signs in it. Scene generators therefore pass ``scale`` explicitly
(the size of the signs in view over 32 px), so the weather is as hard on each sign as on a crop.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CORRUPTIONS: tuple[str, ...] = ("snow", "rain", "fog", "night", "glare", "blur", "noise", "contrast")
CAMERA_FAULTS: tuple[str, ...] = ("jpeg", "motion_blur", "low_light", "defocus", "lens_rain")
KINDS: tuple[str, ...] = CORRUPTIONS + CAMERA_FAULTS
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# Sizes below are tuned at 32 px, the usual classifier input; larger images scale them up.
_REFERENCE_PX = 32.0

# (batch, severity, rng, scale): ``scale`` multiplies the spatial sizes tuned at 32 px
Corruption = Callable[[np.ndarray, int, np.random.Generator, float], np.ndarray]


def apply_corruption(img: np.ndarray, kind: str, severity: int, rng: np.random.Generator, *,
                     scale: float | None = None) -> np.ndarray:
    """Corrupt one HxWx3 uint8 image or an NxHxWx3 batch; returns a new uint8 array of the same shape.

    ``scale`` multiplies the spatial sizes (blur sigma, flake and streak size) tuned at 32 px; the
    default, the image's shorter side over 32 px, is right for sign crops. Pass the size of the
    objects that matter over 32 px for images that hold more than one sign, such as road scenes.
    """
    if kind not in _CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; valid kinds: {', '.join(KINDS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"corruption severity must be an integer 1..5, got {severity!r}")
    if img.dtype != np.uint8 or img.ndim not in (3, 4) or img.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 or NxHxWx3 uint8 array, got {img.dtype} {img.shape}")
    if scale is not None and not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale: expected a positive number (spatial sizes relative to 32 px), got {scale!r}")
    batch = img if img.ndim == 4 else img[None]
    x = batch.astype(np.float32) * np.float32(1 / 255)
    out = _CORRUPTIONS[kind](x, int(severity), rng, _scale(x) if scale is None else float(scale))
    out = np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out if img.ndim == 4 else out[0]


def _scale(x: np.ndarray) -> float:
    """How much larger than the 32 px reference this batch is (the default ``scale``)."""
    return min(x.shape[1], x.shape[2]) / _REFERENCE_PX


def _pick(table: tuple[float, ...], severity: int) -> float:
    return table[severity - 1]


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an NxHxWxC float batch, reflecting at the borders."""
    if sigma <= 0:
        return x
    radius = max(1, int(np.ceil(2.5 * sigma)))
    taps = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (1, 2):
        x = _convolve_axis(x, kernel, axis)
    return x


def _convolve_axis(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """Correlate along one axis as a weighted sum of shifted views (fast for short kernels)."""
    radius = len(kernel) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(x, pad, mode="reflect" if x.shape[axis] > radius else "edge")
    n = x.shape[axis]
    out = np.zeros_like(x)
    index: list[slice] = [slice(None)] * x.ndim
    for k, w in enumerate(kernel):
        index[axis] = slice(k, k + n)
        out += w * padded[tuple(index)]
    return out


def _smooth_field(rng: np.random.Generator, n: int, h: int, w: int, cells: int = 4) -> np.ndarray:
    """Low-frequency random field in [0, 1] of shape NxHxWx1: bilinear upsampling of a coarse grid."""
    grid = rng.random((n, cells, cells), dtype=np.float32)
    ys = np.linspace(0, cells - 1, h, dtype=np.float32)
    xs = np.linspace(0, cells - 1, w, dtype=np.float32)
    y0 = np.minimum(ys.astype(np.int64), cells - 2)
    x0 = np.minimum(xs.astype(np.int64), cells - 2)
    fy = (ys - y0)[None, :, None]
    fx = (xs - x0)[None, None, :]
    top = grid[:, y0][:, :, x0] * (1 - fx) + grid[:, y0][:, :, x0 + 1] * fx
    bottom = grid[:, y0 + 1][:, :, x0] * (1 - fx) + grid[:, y0 + 1][:, :, x0 + 1] * fx
    return (top * (1 - fy) + bottom * fy)[..., None]


def _sprinkle(rng: np.random.Generator, shape: tuple[int, int, int], density: float) -> np.ndarray:
    """Random seed points (NxHxW float mask) with opacity in [0.6, 1] where present."""
    hit = rng.random(shape, dtype=np.float32) < density
    return hit * rng.uniform(0.6, 1.0, size=shape).astype(np.float32)


def _smear(mask: np.ndarray, offsets: list[tuple[int, int]]) -> np.ndarray:
    """Grow seed points into flakes or streaks: the maximum over shifted copies of the mask."""
    out = mask.copy()
    for dy, dx in offsets:
        np.maximum(out, np.roll(mask, (dy, dx), axis=(1, 2)), out=out)
    return out


def snow(x: np.ndarray, severity: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Whitened, low-contrast scene with white flakes; flakes grow with severity and image size."""
    n, h, w, _ = x.shape
    whiten = _pick((0.12, 0.2, 0.28, 0.36, 0.45), severity)
    x = x * (1 - whiten) + whiten * 0.85
    flakes = _sprinkle(rng, (n, h, w), _pick((0.012, 0.02, 0.03, 0.04, 0.055), severity))
    size = max(1, round((1 + (severity >= 3)) * scale))
    flakes = _smear(flakes, [(dy, dx) for dy in range(size) for dx in range(size) if dy or dx])
    flakes = gaussian_blur(flakes[..., None], 0.3 * scale)
    flakes = np.minimum(flakes * 1.3, 1.0)
    return x * (1 - flakes) + flakes * 0.97


def rain(x: np.ndarray, severity: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Darker, hazier scene crossed by slanted light streaks."""
    n, h, w, _ = x.shape
    x = x * (1 - 0.07 * severity)
    haze = 0.04 * severity
    x = x * (1 - haze) + haze * 0.55
    seeds = _sprinkle(rng, (n, h, w), _pick((0.008, 0.012, 0.018, 0.025, 0.032), severity))
    length = max(2, round((2 + severity) * scale))
    slant = rng.choice((-1, 1))  # one wind direction per call, shared by the whole batch
    streaks = _smear(seeds, [(k, int(slant) * (k // 3)) for k in range(1, length)])
    opacity = _pick((0.3, 0.38, 0.45, 0.52, 0.6), severity)
    streaks = streaks[..., None] * opacity
    return x * (1 - streaks) + streaks * 0.82


def fog(x: np.ndarray, severity: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Blend towards light grey, thicker towards the top and in uneven patches."""
    n, h, w, _ = x.shape
    base = _pick((0.25, 0.35, 0.45, 0.55, 0.65), severity)
    vertical = np.linspace(1.15, 0.85, h, dtype=np.float32)[None, :, None, None]
    patches = 0.75 + 0.5 * _smooth_field(rng, n, h, w)
    alpha = np.clip(base * vertical * patches, 0.0, 0.92)
    grey = np.float32(rng.uniform(0.68, 0.82))
    return x * (1 - alpha) + alpha * grey


def night_levels(severity: int) -> tuple[float, float, np.ndarray]:
    """Night's (gamma, gain, RGB tint) at a severity: its darkening without the noise."""
    tint = np.array([1 - 0.04 * severity, 1 - 0.02 * severity, 1 + 0.03 * severity], dtype=np.float32)
    return 1.3 + 0.3 * severity, 0.95 - 0.11 * severity, tint


def night(x: np.ndarray, severity: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Gamma darkening with a blue cast and sensor noise, as with a dashcam after dusk."""
    gamma, gain, tint = night_levels(severity)
    x = gain * np.power(x, gamma) * tint
    sigma = 0.008 + 0.008 * severity
    return x + rng.normal(0.0, sigma, size=x.shape).astype(np.float32)


def glare(x: np.ndarray, severity: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """A bright warm radial blob (low sun, headlight) at a random place, washing out what it covers."""
    n, h, w, _ = x.shape
    cy = rng.uniform(0, h, size=(n, 1, 1, 1)).astype(np.float32)
    cx = rng.uniform(0, w, size=(n, 1, 1, 1)).astype(np.float32)
    radius = _pick((0.18, 0.23, 0.28, 0.33, 0.38), severity) * min(h, w)
    ys = np.arange(h, dtype=np.float32)[None, :, None, None]
    xs = np.arange(w, dtype=np.float32)[None, None, :, None]
    blob = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * radius**2))
    strength = _pick((0.45, 0.6, 0.75, 0.9, 1.05), severity)
    colour = np.array([1.0, 0.96, 0.82], dtype=np.float32)
    washed = x * (1 - 0.05 * severity) + 0.05 * severity * 0.8
    return washed + strength * blob * colour


def blur(x: np.ndarray, severity: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Defocus blur; needs no randomness but takes ``rng`` like every corruption."""
    sigma = _pick((0.6, 0.9, 1.3, 1.8, 2.4), severity) * scale
    return gaussian_blur(x, sigma)


def noise(x: np.ndarray, severity: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Additive Gaussian sensor noise."""
    sigma = _pick((0.03, 0.05, 0.08, 0.11, 0.15), severity)
    return x + rng.normal(0.0, sigma, size=x.shape).astype(np.float32)


def contrast(x: np.ndarray, severity: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Pull every pixel towards the image mean (haze, cheap sensor, overcast)."""
    keep = _pick((0.75, 0.6, 0.45, 0.32, 0.22), severity)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    return mean + (x - mean) * keep


# ---------------------------------------------------------------------------------------------
# Camera faults: what a dashcam does to a sign besides the weather


def jpeg(x: np.ndarray, severity: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """JPEG compression (Pillow's libjpeg, 4:2:0 chroma) at a falling quality: blocks, ringing, colour bleed.

    Compressed at the image's own size, as a crop of a frame a camera stored at low bit rate; needs
    no randomness. 8x8 blocks are a larger share of a 32 px crop than of a 128 px one, which is also
    what happens to a small sign in a compressed frame.
    """
    import io

    from PIL import Image

    quality = _pick((30, 20, 14, 10, 6), severity)
    out = np.empty_like(x)
    for i, img in enumerate(np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(quality), subsampling=2)
        with Image.open(io.BytesIO(buf.getvalue())) as im:
            out[i] = np.asarray(im.convert("RGB"), dtype=np.float32) * np.float32(1 / 255)
    return out


def motion_blur(x: np.ndarray, severity: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Camera shake or a passing sign: the image averaged along a line of random direction per image."""
    n = x.shape[0]
    length = _pick((2.0, 3.0, 4.5, 6.0, 8.0), severity) * scale  # pixels at 32 px
    angles = rng.uniform(0.0, np.pi, size=n)
    taps = max(2, int(np.ceil(length)) + 1)
    out = np.empty_like(x)
    for i in range(n):
        t = np.linspace(-length / 2, length / 2, taps)
        dy, dx = np.round(t * np.sin(angles[i])).astype(int), np.round(t * np.cos(angles[i])).astype(int)
        out[i] = np.mean([_shifted(x[i], int(a), int(b)) for a, b in zip(dy, dx)], axis=0)
    return out


def _shifted(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``img`` moved by (dy, dx) pixels, the border repeated (HxWxC)."""
    h, w = img.shape[:2]
    ys = np.clip(np.arange(h) - dy, 0, h - 1)
    xs = np.clip(np.arange(w) - dx, 0, w - 1)
    return img[ys][:, xs]


def low_light_exposure(severity: int) -> float:
    """The share of the daylight signal the sensor catches in :func:`low_light` at a severity."""
    return _pick((0.25, 0.14, 0.08, 0.05, 0.03), severity)


def low_light(x: np.ndarray, severity: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Under-exposure brightened by the camera's gain: shot and read noise amplified into coloured grain.

    Unlike :func:`night` (a darker picture with a blue cast), the camera here lifts the brightness
    back most of the way, so the image is about as bright as by day but the little light it caught
    is noisy: photon (shot) noise grows with the signal, read noise does not, and both are multiplied
    by the gain; the sensor's bit depth crushes the darkest tones.
    """
    exposure = low_light_exposure(severity)
    linear = np.power(x, 2.2) * exposure
    electrons = 2000.0  # at full scale: a small dashcam pixel; shot noise std = sqrt(signal / electrons)
    shot = rng.normal(0.0, 1.0, size=x.shape).astype(np.float32) * np.sqrt(np.maximum(linear, 0) / electrons)
    read = rng.normal(0.0, 0.004, size=x.shape).astype(np.float32)
    levels = 1023.0  # 10-bit sensor
    signal = np.round(np.clip(linear + shot + read, 0, 1) * levels) / levels
    gain = 0.7 / exposure  # the camera brings the picture back to ~70% of its daylight brightness
    return np.power(np.clip(signal * gain, 0, 1), 1 / 2.2).astype(np.float32)


def defocus(x: np.ndarray, severity: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """An out-of-focus lens: a disc (pillbox) kernel, flatter and with harder edges than :func:`blur`'s Gaussian."""
    radius = _pick((0.8, 1.2, 1.7, 2.3, 3.0), severity) * scale
    r = int(np.ceil(radius))
    ys, xs = np.mgrid[-r:r + 1, -r:r + 1]
    weights = np.clip(radius + 0.5 - np.hypot(ys, xs), 0.0, 1.0).astype(np.float32)  # anti-aliased rim
    weights /= weights.sum()
    pad = ((0, 0), (r, r), (r, r), (0, 0))
    padded = np.pad(x, pad, mode="reflect" if min(x.shape[1:3]) > r else "edge")
    out = np.zeros_like(x)
    h, w = x.shape[1:3]
    for (dy, dx), wgt in np.ndenumerate(weights):
        if wgt:
            out += wgt * padded[:, dy:dy + h, dx:dx + w]
    return out


def lens_rain(x: np.ndarray, severity: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """Water on the lens or windscreen: out-of-focus drops that show a blurred, shifted patch of the scene,
    with trails running down below some of them."""
    n, h, w, _ = x.shape
    drops = int(_pick((2, 3, 5, 7, 9), severity) * max(1.0, h * w / 1024) ** 0.5)
    size = _pick((0.12, 0.15, 0.18, 0.21, 0.24), severity) * min(h, w)  # drop radius, share of the image
    soft = gaussian_blur(x, 1.5 * scale)
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    out = x.copy()
    for i in range(n):
        mask = np.zeros((h, w), np.float32)
        cy, cx = rng.uniform(0, h, drops), rng.uniform(0, w, drops)
        ry = size * rng.uniform(0.5, 1.0, drops)
        rx = ry * rng.uniform(0.7, 1.1, drops)
        trails = rng.random(drops) < 0.5
        for j in range(drops):
            d = ((ys - cy[j]) / ry[j]) ** 2 + ((xs - cx[j]) / rx[j]) ** 2
            mask = np.maximum(mask, np.clip(1.6 * (1.0 - d), 0.0, 1.0))
            if trails[j]:  # a thin trail from the drop down to the bottom edge
                below = (ys > cy[j]) & (np.abs(xs - cx[j]) < 0.35 * rx[j])
                mask = np.maximum(mask, 0.6 * below.astype(np.float32))
        # a drop is a small lens: it shows a blurred patch of the scene from a little above (refraction)
        refracted = _shifted(soft[i], -max(1, round(0.5 * size)), 0)
        m = mask[..., None]
        out[i] = x[i] * (1 - m) + (refracted * 0.9 + 0.08) * m
    return out


_CORRUPTIONS: dict[str, Corruption] = {
    "snow": snow, "rain": rain, "fog": fog, "night": night, "glare": glare,
    "blur": blur, "noise": noise, "contrast": contrast,
    "jpeg": jpeg, "motion_blur": motion_blur, "low_light": low_light, "defocus": defocus, "lens_rain": lens_rain,
}
assert tuple(_CORRUPTIONS) == KINDS
