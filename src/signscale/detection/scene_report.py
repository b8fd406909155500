"""What a person looks at to see why a scene evaluation's figures are what they are: the evidence
:func:`signscale.detection.evaluate.evaluate_scenes` collects on the clean frames (the worst misses and
false alarms as enlarged crops, the frames with the most of them, one frame under each corruption),
bounded in memory, and the report folder written from it and the metrics (``metrics.json``,
``false_alarms.json``, ``report.html``, ``overlays/*.png``).
"""

from __future__ import annotations

import base64
import heapq
import html
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from signscale import storage
from signscale.detection.detect import draw_detections
from signscale.detection.matching import SMALL_PX, box_iou, boxes_and_scores, is_rejected

CLEAN = "clean"  # the condition name of the frames as recorded (metrics.json "conditions")


class _Worst:
    """The ``n`` highest-priority items offered, built only when they make the cut: a real frame set has
    thousands of false alarms, and keeping a crop of each would hold hundreds of MB."""

    def __init__(self, n: int) -> None:
        self.n, self.heap, self.seen = n, [], 0

    def offer(self, priority: float, make: Callable[[], Any]) -> None:
        self.seen += 1
        rank = (priority, -self.seen)  # ties: the earlier frame wins, so the report is reproducible
        if len(self.heap) < self.n:
            heapq.heappush(self.heap, (rank, make()))
        elif self.n and rank > self.heap[0][0]:
            heapq.heapreplace(self.heap, (rank, make()))

    def items(self) -> list[Any]:
        return [item for _, item in sorted(self.heap, key=lambda e: e[0], reverse=True)]


MISS_COLOUR, ALARM_COLOUR = (255, 0, 255), (255, 60, 60)


def context_crop(image: np.ndarray, box: list[float] | np.ndarray, colour: tuple[int, int, int], *,
                 context: float = 3.0, min_side: int = 40, out_side: int = 144) -> np.ndarray:
    """The box with ``context`` times its size of surroundings (at least ``min_side`` px, so a 10 px sign
    shows its pole and neighbours), enlarged to ``out_side`` px (nearest: the pixels the detector saw),
    the box outlined in ``colour``."""
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box)
    side = max(min_side, context * max(x2 - x1, y2 - y1))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    xa, ya = max(0, round(cx - side / 2)), max(0, round(cy - side / 2))
    xb, yb = min(w, max(xa + 1, round(cx + side / 2))), min(h, max(ya + 1, round(cy + side / 2)))
    tile = np.ascontiguousarray(image[ya:yb, xa:xb])
    f = out_side / max(tile.shape[0], tile.shape[1])
    img = Image.fromarray(tile).resize((max(1, round(tile.shape[1] * f)), max(1, round(tile.shape[0] * f))),
                                       Image.NEAREST)
    ImageDraw.Draw(img).rectangle(((x1 - xa) * f - 2, (y1 - ya) * f - 2, (x2 - xa) * f + 1, (y2 - ya) * f + 1),
                                  outline=colour, width=2)
    return np.asarray(img)


def _second_stage(d: dict[str, Any]) -> str:
    if is_rejected(d):
        return f"rejected as not a sign ({d.get('confidence', 0):.2f})"
    if "key" in d:
        return f"named {d['key']} ({d.get('confidence', 0):.2f})"
    return "no second stage"


class Evidence:
    """Collects, on the clean frames, the crops and frames the report shows, bounded in memory."""

    def __init__(self, cfg: Any) -> None:  # a SceneEvalConfig (crops, worst, score_thresh, iou, map_thresh)
        self.cfg = cfg
        self.misses, self.alarms = _Worst(cfg.crops), _Worst(cfg.crops)
        self.miss_frames, self.alarm_frames = _Worst(cfg.worst), _Worst(cfg.worst)
        self.example_index: int | None = None  # the first frame with signs: shown under each corruption
        self.examples: dict[str, np.ndarray] = {}

    def add(self, index: int, key: str, arr: np.ndarray, truth: np.ndarray, keys: list[str],
            dets: list[dict[str, Any]], r: dict[str, Any]) -> None:
        if self.example_index is None and len(truth):
            self.example_index, self.examples[CLEAN] = index, arr
        pb, ps = boxes_and_scores(dets)
        ious = box_iou(truth, pb)
        missed = [k for k, j in enumerate(r["match"]) if j < 0]
        for k in missed:
            side = float(max(truth[k][2] - truth[k][0], truth[k][3] - truth[k][1]))
            self.misses.offer(side, lambda k=k, side=side: {
                "png": _png(context_crop(arr, truth[k], MISS_COLOUR)),
                "caption": f"{key}: {keys[k]}, {side:.0f} px; {self._nearest(dets, ious[k], ps)}"})
        for i in r["false_alarms"]:
            d = dets[i]
            self.alarms.offer(float(d["score"]), lambda d=d: {
                "png": _png(context_crop(arr, d["box"], ALARM_COLOUR)),
                "caption": f"{key}: score {d['score']:.2f}, {_second_stage(d)}"})
        fa = set(r["false_alarms"])
        shown = [dict(d, tag="FP" if i in fa else "") for i, d in enumerate(dets)
                 if d["score"] >= self.cfg.score_thresh and not is_rejected(d)]
        frame = lambda: {"key": key, "image": arr, "detections": shown, "truth": truth.tolist(), "missed": missed,
                         "caption": f"{key}: {len(truth)} signs, missed: {', '.join(keys[k] for k in missed) or 'none'}"
                                    f"; {len(fa)} false alarm(s)"}
        if missed:
            self.miss_frames.offer(len(missed), frame)
        if fa:
            self.alarm_frames.offer(len(fa), frame)

    def _nearest(self, dets: list[dict[str, Any]], ious: np.ndarray, scores: np.ndarray) -> str:
        """Why the sign was missed: no box near it, a box scored under the threshold, a box misplaced,
        or the second stage's rejection."""
        near = [j for j in range(len(dets)) if ious[j] >= self.cfg.iou]
        if near:
            j = max(near, key=lambda j: scores[j])
            d = dets[j]
            why = "rejected by the second stage" if is_rejected(d) else \
                f"under the threshold {self.cfg.score_thresh}" if d["score"] < self.cfg.score_thresh else "taken"
            return f"best box {d['score']:.2f} at IoU {ious[j]:.2f} ({why})"
        if len(dets) and ious.max() > 0:
            j = int(np.argmax(ious))
            return f"closest box IoU {ious[j]:.2f}, score {dets[j]['score']:.2f} (misplaced)"
        return f"no box above {self.cfg.map_thresh}"


def _png(arr: np.ndarray) -> bytes:
    from signscale import images

    return images.encode_png(arr)


def _img(png: bytes, alt: str) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{html.escape(alt)}">'


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None or math.isnan(x) else format(x, fmt)


def _condition_row(name: str, c: dict[str, Any]) -> str:
    cells = [_num(c["map_50"], ".3f"), _num(c["map"], ".3f")]
    cells += [_num(v["recall"], ".1%") for v in c["recall_by_size"].values()]
    cells += [_num(c["recall_small"]["recall"], ".1%"), _num(c["fp_per_image"], ".2f"),
              _num(c["end_to_end_accuracy"], ".1%"),
              f"{c['rejection']['false_alarms_removed']} / {c['rejection']['signs_removed']}"]
    return f"<tr><td>{html.escape(name)}</td>" + "".join(f"<td class=n>{x}</td>" for x in cells) + "</tr>"


_REPORT_STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#1f2933}table{border-collapse:collapse}
td,th{padding:4px 10px;border-bottom:1px solid #ddd}th{font-weight:600;text-align:right}
.n{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(160px,1fr));gap:8px}
.grid figure{margin:0}figure img{border:1px solid #999;image-rendering:pixelated}
figcaption{font-size:12px;color:#444;overflow-wrap:anywhere}figure{display:inline-block;vertical-align:top}
figure.frame{margin:8px}figure.frame img{max-width:1024px;image-rendering:auto}
figure.frame figcaption{max-width:1024px}"""


def write_scene_report(out: str, metrics: dict[str, Any], evidence: Evidence, mined: dict[str, list[list[float]]],
                       *, worst: int = 6) -> dict[str, str]:
    """``metrics.json``, ``false_alarms.json``, ``overlays/*.png`` and ``report.html``."""
    storage.makedirs(out)
    files = {"metrics": storage.join(out, "metrics.json"), "false_alarms": storage.join(out, "false_alarms.json"),
             "report": storage.join(out, "report.html"), "overlays": storage.join(out, "overlays")}
    storage.makedirs(files["overlays"])
    storage.write_json(files["metrics"], metrics)
    storage.write_json(files["false_alarms"], mined)
    m = metrics
    examples = "".join(f"<figure>{_img(_png(_thumb(a)), name)}<figcaption>{html.escape(name)}</figcaption></figure>"
                       for name, a in evidence.examples.items()) if len(m["conditions"]) > 1 else ""
    weather = (f"<h2>Weather and sensor corruptions (severity {m['severity']}, seed {m['seed']}, sized by the signs "
               f"in each frame)</h2>" if len(m["conditions"]) > 1 else "")
    crops = (_crop_grid("Missed signs, largest first (magenta: the sign)", evidence.misses.items(),
                        evidence.misses.seen)
             + _crop_grid("False alarms, highest score first (red: the box)", evidence.alarms.items(),
                          evidence.alarms.seen))
    frames = "".join(_frame_section(out, title, group[:worst])
                     for title, group in (("Frames with the most misses", evidence.miss_frames.items()),
                                          ("Frames with the most false alarms", evidence.alarm_frames.items())))
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>signscale detection report</title>
<style>{_REPORT_STYLE}</style></head><body>
<h1>Sign detection: {m['scenes']} frames, {m['signs']} signs</h1>
<p>detector <code>{html.escape(m['detector'])}</code>, classifier <code>{html.escape(m['classifier'] or '-')}</code>,
data <code>{html.escape(m['data'])}</code></p>{weather}{_figures_table(m)}{_facts(m)}{examples}
{crops}
<h2>Full frames</h2><p>Enlarged 2x. White: ground truth; magenta: missed sign; coloured: detection labelled
"class detector-score/classifier-confidence" (colour = category); red "FP": false alarm.</p>
{frames}</body></html>"""
    storage.write_bytes(files["report"], doc.encode())
    return files


def _figures_table(m: dict[str, Any]) -> str:
    """One row per condition: mAP, recall by size, false alarms per frame, end to end, what rejection removed."""
    head = ("<tr><th>condition</th><th>mAP@0.5</th><th>mAP@[.5:.95]</th>"
            + "".join(f"<th>recall {html.escape(k)} px (n={v['count']})</th>" for k, v in m["recall_by_size"].items())
            + f"<th>recall &lt; {SMALL_PX} px (n={m['recall_small']['count']})</th><th>false alarms / frame</th>"
            "<th>end-to-end 43-class</th><th>rejection removed: false alarms / true signs</th></tr>")
    rows = "".join(_condition_row(name if name == CLEAN else f"{name} (severity {m['severity']})", c)
                   for name, c in m["conditions"].items())
    return f"<table>{head}{rows}</table>"


def _facts(m: dict[str, Any]) -> str:
    rej = m["rejection"]
    return (f"<p>Operating threshold {m['score_thresh']} (mAP over all boxes &ge; {m['map_thresh']}), a sign is "
            f"found at IoU &ge; {m['iou']}. mAP is class-agnostic (&quot;sign&quot;). "
            f"{m['frames_per_s']:.2f} frames/s for the whole pipeline ({html.escape(m['frames_per_s_basis'])}; "
            f"frames {html.escape(', '.join(m['frame_sizes']))}) on {html.escape(m['device'])}. "
            f"The second stage rejected {rej['rejected']} box(es) at the threshold: "
            f"{rej['false_alarms_removed']} false alarm(s) and {rej['signs_removed']} true sign(s) removed "
            f"({rej['fp_per_image_without_rejection']:.2f} false alarms / frame without it). "
            f"{m['hard_negatives']} hard negative(s) (score &ge; {m['mine_thresh']}, IoU &lt; {m['mine_iou']} with "
            f"every sign) in <code>false_alarms.json</code>.</p>")


def _crop_grid(title: str, items: list[dict[str, Any]], seen: int) -> str:
    cells = "".join(f"<figure>{_img(it['png'], it['caption'])}<figcaption>{html.escape(it['caption'])}"
                    f"</figcaption></figure>" for it in items)
    more = f" ({len(items)} of {seen} shown)" if seen > len(items) else ""
    return f"<h2>{html.escape(title)}{more}</h2><div class=grid>{cells or '<p>none</p>'}</div>"


def _frame_section(out: str, title: str, group: list[dict[str, Any]]) -> str:
    """Whole frames with every box drawn, written beside the page and linked: a real 816x480 frame at 2x
    is ~1 MB of PNG, a dozen embedded would bloat the page."""
    cells = []
    for s in group:
        png = _png(draw_detections(s["image"], s["detections"], truth=s["truth"], miss=s["missed"], scale=2))
        name = f"overlays/{_safe(s['key'])}.png"
        storage.write_bytes(storage.join(out, name), png)
        cells.append(f'<figure class=frame><a href="{html.escape(name)}"><img src="{html.escape(name)}" '
                     f'alt="{html.escape(s["key"])}" loading="lazy"></a><figcaption>{html.escape(s["caption"])}'
                     "</figcaption></figure>")
    return f"<h3>{html.escape(title)}</h3>" + ("".join(cells) or "<p>none</p>")


def _thumb(arr: np.ndarray, width: int = 272) -> np.ndarray:
    from PIL import Image

    h, w = arr.shape[:2]
    return np.asarray(Image.fromarray(arr).resize((width, max(1, round(h * width / w))), Image.BILINEAR))


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)[:120]
