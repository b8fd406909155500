"""Pictures people would rather look at than numbers: contact sheets and class histograms.

Rendering only: callers pass arrays and names; nothing here reads datasets or models.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from signscale import storage


def contact_sheet(images: Sequence[np.ndarray], captions: Sequence[str], *, cell: int = 64, columns: int = 0,
                  title: str = "") -> Image.Image:
    """A grid of images with a short caption under each (HxWx3 uint8 arrays of any size)."""
    n = len(images)
    cols = columns or max(1, min(12, math.ceil(math.sqrt(n * 1.5))))
    rows = max(1, math.ceil(n / cols))
    cap_h, top = 14, (22 if title else 0)
    sheet = Image.new("RGB", (cols * (cell + 4) + 4, top + rows * (cell + cap_h + 4) + 4), (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=10)
    if title:
        draw.text((6, 4), title, fill=(20, 20, 20), font=ImageFont.load_default(size=14))
    for i, (im, cap) in enumerate(zip(images, captions)):
        r, c = divmod(i, cols)
        x, y = 4 + c * (cell + 4), top + 4 + r * (cell + cap_h + 4)
        tile = Image.fromarray(np.ascontiguousarray(im)).resize((cell, cell), Image.NEAREST)
        sheet.paste(tile, (x, y))
        draw.text((x + 1, y + cell + 1), cap[: max(4, cell // 6)], fill=(40, 40, 40), font=font)
    return sheet


def save_image(img: Image.Image, url: str) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    storage.write_bytes(url, buf.getvalue())
    return url


def class_histogram_png(counts: Sequence[int], names: Sequence[str], url: str, title: str = "") -> str:
    """Horizontal bar chart of samples per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(counts)
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.22 * n)))
    ax.barh(range(n), counts, color="#3b6ea8")
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"{i} {nm}" for i, nm in enumerate(names)], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("samples")
    ax.set_title(title or "samples per class")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(url, buf.getvalue())
    return url
