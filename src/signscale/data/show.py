"""Looking at data: what a source or a packed dataset holds, as counts and as pictures.

``show`` reads a source's cheap listing (no decode) for the counts, then decodes a few samples
per class for the contact sheet. A scene source (``gtsdb:``, ``yolo:``, ``coco:``, ``scenes-synthetic:``)
is read once, scene by scene, so the counts are the boxes its reader really yields (after dropping
bad ones), and the sheet shows whole frames with every box drawn and named by its class key.
``dataset_info`` and ``dataset_sample`` do the same for packed datasets, the latter through the real
streaming loader, so the picture is what training sees.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from signscale import images, reports
from signscale.data.manifest import Manifest
from signscale.data.sources import Problem, Sample, open_source


@dataclass
class SourceSummary:
    spec: str
    samples: int  # crops, or scenes for a scene source
    classes: int
    tracks: int
    problems: int
    per_class: list[int]  # samples per class, or boxes per class for a scene source
    conditions: dict[str, int]
    problem_reasons: dict[str, int] = field(default_factory=dict)
    sheet: str = ""
    boxes: int | None = None  # a scene source's boxes; None for crops
    frame_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def unit(self) -> str:
        """What ``per_class`` counts."""
        return "samples" if self.boxes is None else "boxes"

    def summary(self) -> str:
        bad = f", {self.problems} problem(s): {dict(self.problem_reasons)}" if self.problems else ""
        sheet = f"; contact sheet: {self.sheet}" if self.sheet else ""
        if self.boxes is not None:
            sizes = ", ".join(f"{n:,} at {k}" for k, n in self.frame_sizes.items())
            return (f"{self.spec}: {self.samples:,} scenes ({sizes}), {self.boxes:,} boxes in {self.classes} classes"
                    f"{bad}{sheet}")
        return (f"{self.spec}: {self.samples:,} samples, {self.classes} classes, {self.tracks:,} tracks"
                f"{bad}{sheet}")


def show(spec: str, *, out: str = "", per_class: int = 2, cell: int = 48, scene_width: int = 272) -> SourceSummary:
    """Count a source's samples per class and track; optionally write a contact sheet PNG.

    Scene sources count scenes and boxes per class, and their sheet shows ``per_class`` frames per class
    (each frame once), ``scene_width`` px wide, with the boxes drawn."""
    from signscale.data.sources.scenes import is_scene_spec

    if is_scene_spec(spec):
        return show_scenes(spec, out=out, per_class=per_class, width=scene_width)
    source = open_source(spec)
    entries = source.entries()
    good = [e for e in entries if isinstance(e, Sample)]
    bad = [e for e in entries if isinstance(e, Problem)]
    counts = Counter(s.label for s in good)
    n_classes = len(source.label_space)
    summary = SourceSummary(
        spec=spec, samples=len(good), classes=len(counts), tracks=len({s.track for s in good if s.track}),
        problems=len(bad), per_class=[counts.get(i, 0) for i in range(n_classes)],
        conditions=dict(Counter(s.condition for s in good)), problem_reasons=dict(Counter(p.reason for p in bad)))
    if out:
        picks: dict[int, list[int]] = {}
        for i, e in enumerate(entries):
            if isinstance(e, Sample) and len(picks.setdefault(e.label, [])) < per_class:
                picks[e.label].append(i)
        tiles, caps = [], []
        for label in sorted(picks):
            for i in picks[label]:
                s = source.read(i)
                if isinstance(s, Problem):
                    continue
                arr = s.image if isinstance(s.image, np.ndarray) else images.decode(s.image)  # type: ignore[arg-type]
                tiles.append(arr)
                caps.append(f"{label} {source.label_space[label].key}")
        sheet = reports.contact_sheet(tiles, caps, cell=cell, title=f"{spec}: {len(good):,} samples")
        summary.sheet = reports.save_image(sheet, out)
    return summary


# ---------------------------------------------------------------------------------------------
# Scene sources: whole frames with their boxes


BOX_COLOUR = (0, 255, 255)  # cyan: rare in road scenes, unlike the red, blue, white and yellow of signs


def show_scenes(spec: str, *, out: str = "", per_class: int = 2, width: int = 272) -> SourceSummary:
    """Scenes, boxes per class and problems of a scene source, read once; optionally a contact sheet of
    frames with their boxes drawn (up to ``per_class`` frames per class, each frame once, frames
    without signs last)."""
    from signscale.data.scene_shards import _problem_reason
    from signscale.data.sources.scenes import open_scene_source

    source = open_scene_source(spec)
    space = source.label_space
    counts: Counter[int] = Counter()
    sizes: Counter[str] = Counter()
    reasons: Counter[str] = Counter(source.describe().get("problems", {}))  # file-level (gt.txt lines)
    scenes = boxes = 0
    picks: dict[int, list[tuple[np.ndarray, str]]] = {}
    empty: list[tuple[np.ndarray, str]] = []
    for i in range(len(source)):
        s = source.read(i)
        if isinstance(s, Problem):
            reasons[s.reason] += 1
            continue
        meta = s.meta or {}
        labels = [int(x) for x in meta.get("labels", [])]
        reasons.update(_problem_reason(p) for p in meta.get("problems", []))
        scenes += 1
        boxes += len(labels)
        counts.update(labels)
        arr = s.image if isinstance(s.image, np.ndarray) else images.decode(s.image)  # type: ignore[arg-type]
        sizes[f"{arr.shape[1]}x{arr.shape[0]}"] += 1
        if not out:
            continue
        want = next((c for c in labels if len(picks.setdefault(c, [])) < per_class), None)
        if want is not None or (not labels and len(empty) < per_class):
            tile = draw_scene_boxes(arr, meta.get("boxes", []), [space[c].key for c in labels], width=width)
            caption = f"{s.key}: {len(labels)} sign(s)"
            (picks[want] if want is not None else empty).append((tile, caption))
    summary = SourceSummary(
        spec=spec, samples=scenes, classes=len(counts), tracks=0, problems=sum(reasons.values()),
        per_class=[counts.get(i, 0) for i in range(len(space))], conditions={},
        problem_reasons=dict(reasons), boxes=boxes, frame_sizes=dict(sizes.most_common()))
    if out:
        tiles = [t for c in sorted(picks) for t in picks[c]] + empty
        sheet, _ = scene_sheet([t for t, _ in tiles], [c for _, c in tiles],
                               title=f"{spec}: {scenes:,} scenes, {boxes:,} boxes")
        summary.sheet = reports.save_image(sheet, out)
    return summary


def draw_scene_boxes(image: np.ndarray, boxes: list[list[float]], keys: list[str], *, width: int = 272
                     ) -> np.ndarray:
    """The frame shrunk to ``width`` px with each box outlined (cyan, dark rim) and its class key written
    in full above it (below it at the top edge), at a size that stays legible on the thumbnail."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = image.shape[:2]
    f = width / w
    img = Image.fromarray(image).resize((width, max(1, round(h * f))), Image.BILINEAR)
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=10)
    placed: list[tuple[float, float, float, float]] = []
    rects = [tuple(round(v * f) for v in b) for b in boxes]
    for x1, y1, x2, y2 in rects:
        d.rectangle((x1 - 2, y1 - 2, x2 + 1, y2 + 1), outline=(0, 0, 0), width=1)
        d.rectangle((x1 - 1, y1 - 1, x2, y2), outline=BOX_COLOUR, width=1)
    for (x1, y1, x2, y2), key in zip(rects, keys):  # labels after all boxes, stacked where signs share a pole
        tw = d.textlength(key, font=font) + 2
        tx = min(max(0, x1), max(0, img.width - tw - 1))
        ty = y1 - 14 if y1 >= 15 else y2 + 3
        step = -12 if ty < y1 else 12
        while any(tx < px2 and px1 < tx + tw and ty < py2 and py1 < ty + 11 for px1, py1, px2, py2 in placed) \
                and 0 <= ty + step <= img.height - 11:
            ty += step
        placed.append((tx, ty, tx + tw, ty + 11))
        d.rectangle((tx, ty, tx + tw, ty + 11), fill=(0, 0, 0))
        d.text((tx + 1, ty - 1), key, fill=(255, 255, 255), font=font)
    return np.asarray(img)


def scene_sheet(tiles: list[np.ndarray], captions: list[str], *, columns: int = 0, title: str = ""
                ) -> tuple[Any, list[tuple[int, int]]]:
    """A grid of frame thumbnails (kept at their aspect ratio, unlike the square crop cells) with a caption
    under each; returns the sheet and each tile's top-left corner."""
    from PIL import Image, ImageDraw, ImageFont

    n = len(tiles)
    cols = columns or max(1, min(6, n))
    tw = max((t.shape[1] for t in tiles), default=64)
    th = max((t.shape[0] for t in tiles), default=40)
    cap_h, top, pad = 14, (22 if title else 0), 4
    rows = max(1, -(-n // cols))
    sheet = Image.new("RGB", (cols * (tw + pad) + pad, top + rows * (th + cap_h + pad) + pad), (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((6, 4), title, fill=(20, 20, 20), font=ImageFont.load_default(size=14))
    font = ImageFont.load_default(size=11)
    corners = []
    for i, (tile, cap) in enumerate(zip(tiles, captions)):
        r, c = divmod(i, cols)
        x, y = pad + c * (tw + pad), top + pad + r * (th + cap_h + pad)
        sheet.paste(Image.fromarray(np.ascontiguousarray(tile)), (x, y))
        draw.text((x + 1, y + th + 1), cap, fill=(40, 40, 40), font=font)
        corners.append((x, y))
    return sheet, corners


# ---------------------------------------------------------------------------------------------
# Packed datasets


@dataclass
class DatasetInfo:
    url: str
    manifest: dict[str, Any]
    count: int
    shards: int
    bytes: int
    per_class: list[int]
    names: list[str]
    histogram: str = ""

    def summary(self) -> str:
        q = self.manifest.get("quarantine", {}).get("count", 0)
        return (f"{self.url}: {self.count:,} samples in {self.shards} shard(s), {self.bytes / 2**20:.1f} MiB, "
                f"{self.manifest['encoding']} encoding, {sum(1 for c in self.per_class if c)} classes, "
                f"{q} quarantined" + (f"; histogram: {self.histogram}" if self.histogram else ""))


def dataset_info(url: str, *, histogram: str = "") -> DatasetInfo:
    m = Manifest.load(url)
    hist = [int(x) for x in m.class_histogram()]
    info = DatasetInfo(url=url, manifest=m.data, count=m.count, shards=len(m.shards),
                       bytes=int(m.data["totals"]["bytes"]), per_class=hist, names=m.label_space.names)
    if histogram:
        info.histogram = reports.class_histogram_png(hist, m.label_space.keys, histogram, title=url)
    return info


def dataset_sample(url: str, *, n: int = 16, out: str = "grid.png", seed: int = 0) -> str:
    """A grid of what the streaming loader yields from ``url`` (first batch of a seeded epoch)."""
    from signscale.data.stream import open_stream

    loader = open_stream(url, num_workers=0, batch_size=n, seed=seed)
    batch = next(iter(loader))
    space = loader.stream.label_space
    m = loader.stream.manifests[0]
    caps = [f"{int(lbl)} {space[int(lbl)].key} {m.conditions[int(c)]}"
            for lbl, c in zip(batch["label"], batch["condition"])]
    sheet = reports.contact_sheet(list(batch["image"].numpy()), caps, cell=64, title=f"{url}: {n} samples")
    return reports.save_image(sheet, out)
