"""Image decoding with the checks a data pipeline needs: size limits, truncation, odd modes.

PIL decodes lazily and reports truncated files and unknown formats as ``OSError`` subclasses,
often only on first pixel access; :func:`decode` forces the decode and turns every failure into
an :class:`ImageError` with a short reason code that quarantine files and HTTP errors can carry.

:func:`decode` is the one decode path (pack, predict, serve, evaluate all call it), and it turns
every input into the pixels a person would see, never silently into something else:

* **16-bit** grey (PNG, TIFF: PIL's ``I;16`` modes) is *scaled* to 8 bits (``round(v * 255 / 65535)``);
  PIL's own conversion clips it, so grey 40000 would become white. 16-bit RGB arrives from PIL
  already reduced to its high byte (``v >> 8``, at most one level below the rounded value).
* **Transparency** (alpha channels, palette or single-colour ``tRNS`` transparency) is composited on
  :data:`BACKGROUND`, white, the way browsers and viewers show such a file on a page; dropping the
  alpha would show whatever colour the transparent pixels happen to store.
* **CMYK** (print JPEGs, Adobe-inverted ones included) is converted to RGB.
* **EXIF orientation** is applied, so a phone photo taken upright is decoded upright.
* **Animated** images (GIF, APNG, WebP) decode their first frame.
"""

from __future__ import annotations

import io
import re
import struct
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps

# Well under Pillow's own bomb limit (~89M pixels): a sign image is never this large, a scene is
# at most a few megapixels, and a crafted header should be refused before any allocation.
DEFAULT_MAX_PIXELS = 40_000_000

# Transparent pixels are shown on white: what a browser or an image viewer shows for a PNG sign
# cut out of its background, and so what a person labelling the file saw.
BACKGROUND = (255, 255, 255)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ORIENTATION = ExifTags.Base.Orientation


class ImageError(ValueError):
    """An image that cannot be used; ``reason`` is a stable code (empty, not_an_image, truncated, ...)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _stable(exc: BaseException) -> str:
    """The error text without object addresses, so the same bad file gives the same quarantine line."""
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<data>", str(exc))


def open_checked(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``data`` as an image, refusing empty input, non-images and oversized headers."""
    if not data:
        raise ImageError("empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError("too_many_pixels", str(exc)) from None
    except Image.DecompressionBombWarning as exc:
        raise ImageError("too_many_pixels", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError("not_an_image", f"{type(exc).__name__}: {_stable(exc)}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError("bad_size", f"{w}x{h}")
    if w * h > max_pixels:
        raise ImageError("too_many_pixels", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
    return img


def decode(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode to an HxWx3 uint8 RGB array, forcing the full decode so truncation is caught here.

    The first frame, upright per EXIF, 16-bit scaled, transparency on :data:`BACKGROUND` (module doc).
    """
    img = open_checked(data, max_pixels=max_pixels)
    try:
        img.seek(0)  # animated images: the first frame (PIL opens there; said here so it stays so)
        img.load()
        arr = to_rgb8(_upright(img))
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        raise ImageError("truncated" if "truncat" in str(exc).lower() else "undecodable",
                         f"{type(exc).__name__}: {exc}") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError("undecodable", f"unexpected array shape {arr.shape}")
    return arr


def _upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation tag says (2..8); unchanged (not copied) without one."""
    if img.getexif().get(_ORIENTATION, 1) in range(2, 9):
        return ImageOps.exif_transpose(img)
    return img


def to_rgb8(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8 RGB, scaling 16-bit grey and compositing transparency (module doc)."""
    if img.mode in _SIXTEEN_BIT_MODES:
        wide = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        grey = ((wide * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return _on_background(np.asarray(img.convert("RGBA"), dtype=np.uint8))
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, P without transparency, CMYK (Adobe-inverted handled on read), YCbCr
    return np.asarray(img, dtype=np.uint8)


def _on_background(rgba: np.ndarray) -> np.ndarray:
    """Alpha-composite RGBA pixels over :data:`BACKGROUND`, rounded to the nearest level."""
    alpha = rgba[:, :, 3:4].astype(np.uint32)
    bg = np.asarray(BACKGROUND, dtype=np.uint32)
    out = (rgba[:, :, :3].astype(np.uint32) * alpha + bg * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone."""
    return open_checked(data).size


def resize(arr: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an HxWx3 uint8 array to ``size`` (square int, or (h, w)) with antialiasing."""
    h, w = (size, size) if isinstance(size, int) else size
    if arr.shape[:2] == (h, w):
        return arr
    return np.asarray(Image.fromarray(arr).resize((w, h), Image.BILINEAR, reducing_gap=None), dtype=np.uint8)


def crop_window(box: tuple[float, float, float, float], width: int, height: int,
                margin: float = 0.0) -> tuple[int, int, int, int]:
    """The pixel window (xa, ya, xb, yb) that :func:`crop_box` cuts: the box with a relative margin,
    rounded and clipped to a ``width`` x ``height`` image (known without the pixels)."""
    x1, y1, x2, y2 = box
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    xa, ya = max(0, int(round(x1 - mx))), max(0, int(round(y1 - my)))
    xb, yb = min(width, int(round(x2 + mx))), min(height, int(round(y2 + my)))
    if xb <= xa or yb <= ya:
        raise ImageError("bad_box", f"box {box} is empty inside a {width}x{height} image")
    return xa, ya, xb, yb


def crop_box(arr: np.ndarray, box: tuple[float, float, float, float], margin: float = 0.0) -> np.ndarray:
    """Crop (x1, y1, x2, y2) with a relative margin, clipped to the image."""
    xa, ya, xb, yb = crop_window(box, arr.shape[1], arr.shape[0], margin)
    return arr[ya:yb, xa:xb]


def encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_roundtrip(arr: np.ndarray, quality: int) -> np.ndarray:
    """``arr`` (HxWx3 uint8) encoded as JPEG at ``quality`` and decoded again: a camera's compression."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))  # a writable copy
