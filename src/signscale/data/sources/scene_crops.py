"""``scene-crops:``: the signs of a packed scene dataset, cut out the way the detect pipeline cuts them.

The second stage of :mod:`signscale.detection.detect` is a crop classifier. Trained on clean GTSRB crops, it
meets something else in road scenes: small signs, partly hidden, weathered, cut out by a detector
box that is a few pixels off. This source turns the boxes of a packed *training* scene dataset
(:func:`signscale.data.scene_shards.pack_scenes`) into crops, so the classifier can be trained or
fine-tuned on what the pipeline will show it::

    signscale pack "scene-crops:/data/det/scenes-train?margin=0&jitter=0.1&copies=2" /data/det/crops-train

Sample ``i`` is copy ``k`` of box ``j`` of one scene record, indices running scene by scene, box by
box, copy by copy. Each copy's box is *jittered* like a detector's: its centre moves by up to
``jitter`` x its width/height and each side is scaled by a factor in ``[1 - jitter, 1 + jitter]``,
drawn from ``np.random.default_rng([seed, i, ...])``, so sample ``i`` depends only on ``(seed, i)``
(any process, any order). The jittered box is cropped with :func:`signscale.images.crop_box` and the
relative ``margin``, exactly as :class:`signscale.detection.detect.DetectPipeline` does. All crops of one scene
share a ``track``, so a track-aware split never puts one scene on both sides.

**"Not a sign" crops.** With ``background=N`` each scene also gives N crops of background, boxes
placed away from every sign (IoU < 0.05) at the sizes of the scene's own signs, and with
``negatives=URL`` the boxes a detector wrongly fired on (``false_alarms.json`` of ``signscale
evaluate-scenes``: ``{scene key: [[x1, y1, x2, y2, score], ...]}``). Both are labelled ``not_a_sign``
in the scene set's label space plus that class (:meth:`LabelSpace.with_background`), so the second
stage learns to reject a false box instead of naming it.

The index is built once from the shards' per-record JSON extras (boxes, labels, countries) and
metadata records; no image is decoded until :meth:`SceneCropSource.read`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from signscale import images, storage
from signscale.data import shards
from signscale.data.manifest import Manifest
from signscale.data.sources.base import Problem, Sample, Source, SourceError
from signscale.data.sources.folder import normalize_location

KIND = "scene-crops"
_SALT = 0x5C3C  # separates this source's random stream from others seeded with [seed, index]
_BG_SALT = 0xB6B6
_EXAMPLE = "scene-crops:/data/det/scenes-train?margin=0&jitter=0.1&copies=2&seed=0&min_px=6&background=2"
_NEGATIVE_IOU = 0.3  # a mined box overlapping a sign this much is not used as "not a sign"


def box_iou_one(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one (x1, y1, x2, y2) box with each row of ``others``."""
    if not len(others):
        return np.zeros(0)
    ix = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = ix * iy
    union = (box[2] - box[0]) * (box[3] - box[1]) + (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / np.maximum(union - inter, 1e-9)


def background_boxes(signs: np.ndarray, size: tuple[int, int], n: int, rng: np.random.Generator,
                     tries: int = 20) -> list[list[float]]:
    """Up to ``n`` boxes of background in a ``size`` (w, h) scene, each overlapping no sign (IoU < 0.05),
    sized like the scene's signs (10-64 px log-uniform in a scene without any)."""
    w, h = size
    out: list[list[float]] = []
    sides = np.maximum(signs[:, 2] - signs[:, 0], signs[:, 3] - signs[:, 1]) if len(signs) else None
    for _ in range(n):
        for _ in range(tries):
            side = float(rng.choice(sides) * rng.uniform(0.7, 1.4) if sides is not None
                         else np.exp(rng.uniform(np.log(10), np.log(64))))
            bw, bh = side * rng.uniform(0.85, 1.15), side
            if bw >= w or bh >= h:
                continue
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            box = np.array([x, y, x + bw, y + bh])
            if (box_iou_one(box, signs) < 0.05).all():
                out.append([float(v) for v in box])
                break
    return out


def jitter_box(box: np.ndarray, jitter: float, rng: np.random.Generator) -> np.ndarray:
    """``box`` (x1, y1, x2, y2) with its centre moved by up to ``jitter`` x its size and each side
    scaled by a factor in [1 - jitter, 1 + jitter]; ``jitter=0`` returns the box unchanged."""
    box = np.asarray(box, dtype=np.float64)
    if jitter == 0:
        return box.copy()
    dx, dy, sx, sy = rng.uniform(-1.0, 1.0, size=4)
    w, h = box[2] - box[0], box[3] - box[1]
    cx, cy = (box[0] + box[2]) / 2 + dx * jitter * w, (box[1] + box[3]) / 2 + dy * jitter * h
    w, h = w * (1 + sx * jitter), h * (1 + sy * jitter)
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


class SceneCropSource(Source):
    """One sample per (scene record, box, copy) of a packed scene dataset; see the module docstring."""

    kind = KIND

    def __init__(self, url: str, *, margin: float = 0.0, jitter: float = 0.1, copies: int = 1, seed: int = 0,
                 min_px: int = 6, background: int = 0, negatives: str = "", spec: str = "") -> None:
        self.url = url
        self.manifest = Manifest.load(url)
        space = self.manifest.label_space
        if background or negatives:
            space = space.with_background()
        extra = (f"&background={background}" if background else "") + (f"&negatives={negatives}" if negatives else "")
        super().__init__(space, spec or f"{KIND}:{url}?margin={margin}&jitter={jitter}"
                         f"&copies={copies}&seed={seed}&min_px={min_px}{extra}")
        self.margin, self.jitter, self.copies, self.seed, self.min_px = margin, jitter, copies, seed, min_px
        self.background, self.negatives = background, negatives
        self._mined = read_false_alarms(negatives) if negatives else {}
        self._build_index()
        self._readers: dict[int, shards.ShardReader] = {}
        self._scene: tuple[int, np.ndarray] | None = None  # the last decoded scene: (position, pixels)

    def _build_index(self) -> None:
        """Boxes, labels and countries of every record, from the extras alone (no image decoded)."""
        m = self.manifest
        conditions, countries = m.conditions, m.countries
        keys: list[str] = []
        scene_condition: list[str] = []
        sizes: list[tuple[int, int] | None] = []  # (width, height) when the extras record them
        counts: list[int] = []
        boxes: list[list[float]] = []
        labels: list[int] = []
        box_country: list[str] = []
        kinds: list[str] = []  # "box" (a sign), "bg" (background cut away from signs), "neg" (a mined false alarm)
        for s in range(len(m.shards)):
            reader = shards.ShardReader(m.shard_url(s))
            recs = reader.records()
            for local, extra in enumerate(reader.extras()):
                position = int(m.starts[s]) + local
                rec = recs[local]
                keys.append(str(extra.get("key") or position))
                cond = extra.get("condition")
                if cond is None:  # pack_scenes keeps the condition in the record, as an index
                    c = int(rec["condition"])
                    cond = conditions[c] if 0 <= c < len(conditions) else "clear"
                scene_condition.append(str(cond))
                w, h = extra.get("width"), extra.get("height")
                sizes.append((int(w), int(h)) if w and h else None)
                bx, lb = extra.get("boxes", []), extra.get("labels", [])
                cs = extra.get("countries") or []
                n = min(len(bx), len(lb))
                counts.append(n)
                record_country = countries[int(rec["country"])] if int(rec["country"]) < len(countries) else "de"
                for j in range(n):
                    boxes.append([float(v) for v in bx[j]])
                    labels.append(int(lb[j]))
                    box_country.append(str(cs[j]) if j < len(cs) else record_country)
                    kinds.append("box")
                extra_boxes = self._not_signs(len(keys) - 1, keys[-1],
                                              np.asarray(bx[:n], dtype=np.float64).reshape(-1, 4), sizes[-1])
                for kind, b in extra_boxes:
                    boxes.append(b)
                    labels.append(self.label_space.background_id)  # type: ignore[arg-type]
                    box_country.append(record_country)
                    kinds.append(kind)
                counts[-1] += len(extra_boxes)
        self._keys, self._conditions, self._sizes, self._kinds = keys, scene_condition, sizes, kinds
        self._boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        self._labels = np.asarray(labels, dtype=np.int64)
        self._countries = box_country
        self._box_start = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)

    def _not_signs(self, scene: int, key: str, signs: np.ndarray, size: tuple[int, int] | None
                   ) -> list[tuple[str, list[float]]]:
        """The "not a sign" boxes of one scene: background boxes (needs the scene size) and mined ones."""
        out: list[tuple[str, list[float]]] = []
        if self.background and size is not None:
            rng = np.random.default_rng([self.seed, scene, _BG_SALT])
            out += [("bg", b) for b in background_boxes(signs, size, self.background, rng)]
        for b in self._mined.get(key, []):
            box = np.asarray(b[:4], dtype=np.float64)
            if (box_iou_one(box, signs) < _NEGATIVE_IOU).all():
                out.append(("neg", [float(v) for v in box]))
        return out

    # -- addressing ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._box_start[-1]) * self.copies

    def _locate(self, index: int) -> tuple[int, int, int]:
        """(scene position, box index within the scene, copy) of sample ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        flat_box, copy = divmod(index, self.copies)
        scene = int(np.searchsorted(self._box_start, flat_box, side="right") - 1)
        return scene, flat_box - int(self._box_start[scene]), copy

    def _plan(self, index: int) -> tuple[Sample | Problem, np.ndarray, tuple[int, int, int, int] | None]:
        """Sample ``index`` without its image (or its problem), its jittered box, and the sign's box
        inside the crop; everything but the pixels, computed from the index alone."""
        scene, j, k = self._locate(index)
        flat = int(self._box_start[scene]) + j
        box, label = self._boxes[flat], int(self._labels[flat])
        key = f"{self._keys[scene]}#{self._kinds[flat]}{j}#c{k}"
        jittered = jitter_box(box, self.jitter, np.random.default_rng([self.seed, index, _SALT]))
        longer = max(box[2] - box[0], box[3] - box[1])
        if longer < self.min_px:
            return Problem(key, "box_too_small", f"longer side {longer:g} px < min_px={self.min_px}", self.spec), \
                jittered, None
        roi = None
        size = self._sizes[scene]
        if size is not None:  # known without decoding: entries() lists exactly what read() gives
            try:
                roi = self._roi(jittered, size)
            except images.ImageError as exc:
                return Problem(key, exc.reason, exc.detail, self.spec), jittered, None
        sample = Sample(key=key, label=label, source=self.spec, track=self._keys[scene], roi=roi,
                        condition=self._conditions[scene], country=self._countries[flat],
                        meta={"scene": scene, "box": [round(float(v), 2) for v in box],
                              "jittered": [round(float(v), 2) for v in jittered]})
        return sample, jittered, roi

    def _roi(self, jittered: np.ndarray, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
        """The jittered box in crop pixels (the crop minus its margin), so ``pack --crop roi`` gives the
        margin-free crop; raises :class:`images.ImageError` where :func:`images.crop_box` would."""
        x1, y1, x2, y2 = (float(v) for v in jittered)
        xa, ya, xb, yb = images.crop_window((x1, y1, x2, y2), size[0], size[1], self.margin)
        rx1, ry1 = max(0, round(x1) - xa), max(0, round(y1) - ya)
        rx2, ry2 = min(xb - xa, round(x2) - xa), min(yb - ya, round(y2) - ya)
        return (rx1, ry1, rx2, ry2) if rx2 > rx1 and ry2 > ry1 else None

    # -- reading ---------------------------------------------------------------------------------

    def _decode_scene(self, scene: int) -> np.ndarray:
        # Consecutive indices are crops of one scene: keep the last decoded scene (one entry is
        # enough for an in-order reader, and bounds memory in every pack / DataLoader worker).
        if self._scene is not None and self._scene[0] == scene:
            return self._scene[1]
        s, local = self.manifest.locate(scene)
        reader = self._readers.get(s)
        if reader is None:
            reader = self._readers[s] = shards.ShardReader(self.manifest.shard_url(s))
        arr = images.decode(reader.blobs_at(np.array([local]))[0])
        self._scene = (scene, arr)
        return arr

    def read(self, index: int) -> Sample | Problem:
        item, jittered, roi = self._plan(index)
        if isinstance(item, Problem):
            return item
        scene = int(item.meta["scene"])
        try:
            arr = self._decode_scene(scene)
            crop = images.crop_box(arr, tuple(float(v) for v in jittered), margin=self.margin)
        except images.ImageError as exc:
            return Problem(item.key, exc.reason, exc.detail, self.spec)
        if self._sizes[scene] is None:  # extras without width/height: the ROI needs the decoded size
            roi = self._roi(jittered, (arr.shape[1], arr.shape[0]))
        # a copy, not a view, so a kept sample does not pin the whole cached scene
        return Sample(key=item.key, label=item.label, image=np.ascontiguousarray(crop), source=self.spec,
                      track=item.track, roi=roi, condition=item.condition, country=item.country, meta=item.meta)

    def entries(self) -> list[Sample | Problem]:
        """Every sample without pixels (and every problem known without decoding), cheaply."""
        return [self._plan(i)[0] for i in range(len(self))]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "dataset": self.url, "dataset_checksum": self.manifest.checksum(),
                "dataset_name": self.manifest.name, "scenes": len(self._keys), "boxes": len(self._labels),
                "margin": self.margin, "jitter": self.jitter, "copies": self.copies, "seed": self.seed,
                "min_px": self.min_px, "background": self.background, "negatives": self.negatives,
                "not_a_sign": sum(k != "box" for k in self._kinds)}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_readers"] = {}  # shard readers (memory maps) are reopened in the receiving process
        state["_scene"] = None
        return state


def _option(name: str, value: Any, kind: type, lo: float, hi: float, example: str) -> Any:
    try:
        v = kind(value)
    except (TypeError, ValueError):
        expected = "an integer" if kind is int else "a number"
        raise SourceError(f"{KIND}: option {name}={value!r} must be {expected}, e.g. {name}={example}") from None
    if not lo <= v <= hi:
        raise SourceError(f"{KIND}: option {name}={v} is outside {lo}..{hi}, e.g. {name}={example}")
    return v


def read_false_alarms(url: str) -> dict[str, list[list[float]]]:
    """``false_alarms.json`` ({scene key: [[x1, y1, x2, y2, score], ...]}), checked row by row."""
    try:
        data = storage.read_json(url)
    except (OSError, ValueError, storage.StorageError) as exc:
        raise SourceError(f"{KIND}: negatives={url}: cannot read it ({exc}); give the false_alarms.json that "
                          "`signscale evaluate-scenes` writes") from None
    if not isinstance(data, dict):
        raise SourceError(f"{KIND}: negatives={url}: expected an object {{scene key: [[x1, y1, x2, y2, score], ...]}}")
    out: dict[str, list[list[float]]] = {}
    for key, rows in data.items():
        for n, row in enumerate(rows if isinstance(rows, list) else [rows]):
            if not (isinstance(row, list) and len(row) >= 4 and all(isinstance(v, (int, float)) for v in row[:4])
                    and row[2] > row[0] and row[3] > row[1]):
                raise SourceError(f"{KIND}: negatives={url}: scene {key!r} row {n}: expected [x1, y1, x2, y2, score] "
                                  f"with x2 > x1 and y2 > y1, got {row!r}")
            out.setdefault(str(key), []).append([float(v) for v in row[:4]])
    return out


def open_scene_crops(location: str, *, spec: str = "", margin: str | float = "0.0", jitter: str | float = "0.1",
                     copies: str | int = "1", seed: str | int = "0", min_px: str | int = "6",
                     background: str | int = "0", negatives: str = "") -> SceneCropSource:
    """``scene-crops:DATASET_URL?margin=0&jitter=0.1&copies=1&seed=0&min_px=6&background=0&negatives=URL``:
    the boxed signs of a packed scene dataset as crops, plus ``background`` crops per scene and the mined
    ``negatives`` as "not a sign". ``margin`` is the relative margin the pipeline crops with (0 for a
    classifier trained on ROI crops); ``jitter`` <= 0.9 keeps every jittered side positive."""
    opts = {"margin": _option("margin", margin, float, 0.0, 2.0, "0.1"),
            "jitter": _option("jitter", jitter, float, 0.0, 0.9, "0.1"),
            "copies": _option("copies", copies, int, 1, 1000, "2"),
            "seed": _option("seed", seed, int, 0, 2**32 - 1, "0"),
            "min_px": _option("min_px", min_px, int, 0, 100_000, "6"),
            "background": _option("background", background, int, 0, 1000, "2"),
            "negatives": str(negatives)}
    if not location:
        raise SourceError(f"{KIND}: no dataset given; expected a packed scene dataset, e.g. {_EXAMPLE}")
    url = normalize_location(location)
    from signscale.data.scene_shards import is_scene_dataset

    if not is_scene_dataset(url):
        raise SourceError(f"{KIND}: {location!r} is not a packed scene dataset (no manifest with \"scenes\": true); "
                          f"pack scenes with `signscale pack-scenes SCENE_SOURCE {location}` first")
    return SceneCropSource(url, spec=spec, **opts)

