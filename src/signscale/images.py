"""Image decoding with the checks a data pipeline needs: size limits, truncation, odd modes.

PIL decodes lazily and reports truncated files and unknown formats as ``OSError`` subclasses,
often only on first pixel access; :func:`decode` forces the decode and turns every failure into
an :class:`ImageError` with a short reason code that quarantine files and HTTP errors can carry.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image

# Well under Pillow's own bomb limit (~89M pixels): a sign image is never this large, a scene is
# at most a few megapixels, and a crafted header should be refused before any allocation.
DEFAULT_MAX_PIXELS = 40_000_000


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
    """Decode to an HxWx3 uint8 RGB array, forcing the full decode so truncation is caught here."""
    img = open_checked(data, max_pixels=max_pixels)
    try:
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError("truncated" if "truncat" in str(exc).lower() else "undecodable",
                         f"{type(exc).__name__}: {exc}") from None
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageError("undecodable", f"unexpected array shape {arr.shape}")
    return arr


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
