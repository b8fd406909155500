"""The evaluation report's charts: five or six PNGs drawn from the metrics dict of an evaluation.

Rendering only (split from :mod:`signscale.evaluation.report_html`, which writes them beside the
page and embeds them in it): nothing here reads models or data. Charts are drawn with matplotlib's
object API (``Figure``, which renders through Agg) rather than ``pyplot``, so no global backend or
figure state is touched and nothing needs a display.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["PNG_NAMES", "num", "pct", "render_charts"]

PNG_NAMES = ("confusion", "per_class", "confusions", "reliability", "risk_coverage", "robustness")
DPI = 110
INK = "#1f2933"
MUTED = "#6b7785"
ACCENT = "#2f6db3"
BAD = "#c8372d"
GOOD = "#2e8b57"


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, facecolor="white")
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white", bbox_inches="tight", pad_inches=0.15)
    return buf.getvalue()


def _style(ax: Any) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#9aa5b1")
    ax.tick_params(colors=INK, labelsize=8)


def render_charts(metrics: Mapping[str, Any], *, example_images: Sequence[Sequence[np.ndarray]] = (),
                  class_images: Mapping[int, np.ndarray] | None = None) -> dict[str, bytes]:
    """name -> PNG bytes; ``robustness`` only when the metrics have corruption results."""
    charts = {"confusion": confusion_png(metrics), "per_class": per_class_png(metrics),
              "confusions": confusions_png(metrics, example_images, class_images or {}),
              "reliability": reliability_png(metrics)}
    if (metrics.get("selective") or {}).get("curve"):
        charts["risk_coverage"] = risk_coverage_png(metrics)
    if metrics.get("robustness"):
        charts["robustness"] = robustness_png(metrics)
    return charts


def _tick_labels(metrics: Mapping[str, Any]) -> list[str]:
    return [f"{c['id']} {c['key']}" for c in metrics["classes"]]


def confusion_png(metrics: Mapping[str, Any]) -> bytes:
    """Row-normalised confusion matrix (each row sums to 1: where a true class's samples went).

    A square-root colour scale keeps a 1% confusion visible next to a 99% diagonal; cells of the
    listed top confusions are outlined and carry their counts. Rows of classes without samples are grey.
    """
    from matplotlib import colors

    cm = np.asarray(metrics["confusion"]["matrix"], dtype=np.float64)
    n = cm.shape[0]
    support = cm.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(support > 0, cm / np.maximum(support, 1), np.nan)
    side = min(16.0, max(5.0, 0.2 * n + 3.2))
    fig = _figure(side + 1.2, side)
    ax = fig.add_axes((0.2, 0.2, 0.72 * side / (side + 1.2), 0.72))
    cmap = _cmap("Blues").with_extremes(bad="#eceff3")
    im = ax.imshow(np.ma.masked_invalid(norm), cmap=cmap, norm=colors.PowerNorm(0.5, vmin=0, vmax=1),
                   interpolation="nearest", aspect="equal")
    labels = _tick_labels(metrics)
    size = 8 if n <= 20 else (6.5 if n <= 50 else 5)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=size, color=INK)
    ax.set_yticks(range(n), labels, fontsize=size, color=INK)
    edges = np.arange(-0.5, n, 1)  # cell borders as two line collections (minor ticks cost ~0.5 s at 43 classes)
    ax.hlines(edges, -0.5, n - 0.5, color="white", linewidth=0.4)
    ax.vlines(edges, -0.5, n - 0.5, color="white", linewidth=0.4)
    ax.tick_params(length=2)
    ax.set_xlabel("predicted class", fontsize=10, color=INK)
    ax.set_ylabel("true class", fontsize=10, color=INK)
    from matplotlib.patches import Rectangle

    for c in metrics.get("top_confusions", []):
        t, p = c["true_id"], c["predicted_id"]
        ax.add_patch(Rectangle((p - 0.5, t - 0.5), 1, 1, fill=False, edgecolor=BAD, linewidth=1.0))
        dark = np.isfinite(norm[t, p]) and math.sqrt(norm[t, p]) > 0.4  # the colour scale is a square root
        ax.text(p, t, str(c["count"]), ha="center", va="center", fontsize=max(4.0, size - 1.5),
                color="white" if dark else BAD, fontweight="bold")
    o = metrics["overall"]
    ax.set_title(f"Confusion matrix, row-normalised ({o['count']:,} images, top-1 {pct(o['top1'])}); "
                 "red: most frequent confusions with counts", fontsize=10, color=INK, loc="left")
    cax = fig.add_axes((0.2 + 0.72 * side / (side + 1.2) + 0.02, 0.2, 0.015, 0.72))
    bar = fig.colorbar(im, cax=cax)
    bar.set_ticks([0, 0.01, 0.05, 0.2, 0.5, 1.0], labels=["0", "1%", "5%", "20%", "50%", "100%"])
    bar.ax.tick_params(labelsize=8, colors=INK)
    bar.set_label("share of the true class (square-root scale)", fontsize=8, color=INK)
    return _png(fig)


def per_class_png(metrics: Mapping[str, Any]) -> bytes:
    """Recall (per-class accuracy) bars with precision ticks and support, one row per class."""
    classes = metrics["classes"]
    n = len(classes)
    recall = np.array([np.nan if c["recall"] is None else c["recall"] for c in classes])
    prec = np.array([np.nan if c["precision"] is None else c["precision"] for c in classes])
    finite = np.concatenate([recall[np.isfinite(recall)], prec[np.isfinite(prec)]])
    low = float(finite.min()) if finite.size else 0.0
    # near-perfect models differ in the last percent: start the axis just below the worst value
    lo = max(0.0, math.floor((low - 0.02) * 20) / 20) if low > 0.5 else 0.0
    fig = _figure(9.0, max(3.0, 0.19 * n + 1.3))
    ax = fig.add_axes((0.3, 0.9 / (0.19 * n + 1.3), 0.6, 1 - 1.35 / (0.19 * n + 1.3)))
    cmap = _cmap("RdYlGn")
    colours = [cmap(0.15 + 0.75 * max(0.0, (r - lo) / max(1e-9, 1 - lo))) if np.isfinite(r) else "#d5dbe1"
               for r in recall]
    y = np.arange(n)
    ax.barh(y, np.where(np.isfinite(recall), recall - lo, 0), left=lo, color=colours, height=0.72,
            label="recall (per-class accuracy)")
    ax.scatter(np.where(np.isfinite(prec), prec, np.nan), y, marker="|", s=60, color=INK, linewidths=1.6,
               label="precision", zorder=3)
    top1 = metrics["overall"]["top1"]
    if top1 is not None:
        ax.axvline(top1, color=ACCENT, linestyle="--", linewidth=1, label=f"overall top-1 {pct(top1)}")
    ax.set_yticks(y, _tick_labels(metrics), fontsize=7 if n > 20 else 8, color=INK)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(lo, 1.0)
    for i, c in enumerate(classes):
        txt = f"{pct(c['recall'], 1)}  n={c['support']:,}" if c["support"] else "no samples"
        ax.text(1.005, i, txt, va="center", ha="left", fontsize=6.5, color=MUTED, transform=ax.get_yaxis_transform())
    _style(ax)
    ax.set_xlabel("recall" + (f" (axis starts at {lo:.0%})" if lo > 0 else ""), fontsize=9, color=INK)
    ax.xaxis.set_major_formatter(_percent_formatter())
    ax.grid(axis="x", color="#e4e7eb", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=3, fontsize=8, frameon=False)
    return _png(fig)


# The confusions picture's layout in pixels: example tiles, the gaps between them, the arrow, a card's
# heading and foot, the canvas margin and the space between two columns of cards.
_TILE, _GAP, _ARROW_W, _HEAD, _FOOT, _MARGIN, _BETWEEN = 80, 12, 46, 38, 18, 10, 44
_CARD_W, _CARD_H = 5 * _TILE + 4 * _GAP + _ARROW_W, _HEAD + _TILE + _FOOT + 12
_Text = tuple[float, float, str, dict[str, Any]]


def confusions_png(metrics: Mapping[str, Any], example_images: Sequence[Sequence[np.ndarray]],
                   class_images: Mapping[int, np.ndarray]) -> bytes:
    """The most frequent confusions: misclassified examples, then what the predicted class looks like.

    The tiles are composed into one pixel canvas and drawn with a single ``imshow`` (a grid of 120
    small axes takes seconds to render); the text is laid over it in pixel coordinates.
    """
    top = list(metrics.get("top_confusions", []))
    names = {c["id"]: c["name"] for c in metrics["classes"]}
    if not top:
        fig = _figure(7, 1.2)
        o = metrics["overall"]
        msg = ("No confusions: every scored image was classified correctly." if o["correct"] == o["count"] else
               "No confusions listed (the evaluation was run with examples=0).")
        fig.text(0.5, 0.5, msg, ha="center", va="center", fontsize=11, color=INK)
        return _png(fig)
    cols = 2 if len(top) > 4 else 1
    rows = math.ceil(len(top) / cols)
    width, height = 2 * _MARGIN + cols * _CARD_W + (cols - 1) * _BETWEEN, 30 + rows * _CARD_H
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    texts: list[_Text] = [
        (_MARGIN, 18, ("Most frequent confusions: misclassified examples (red), then a correctly classified sample "
                       "of the class they were taken for (green)"), {"fontsize": 10, "color": INK})]
    for k, c in enumerate(top):
        x0, y0 = _MARGIN + (k // rows) * (_CARD_W + _BETWEEN), 30 + (k % rows) * _CARD_H
        imgs = list(example_images[k]) if k < len(example_images) else []
        texts += _confusion_card(canvas, k, c, names, imgs, class_images.get(c["predicted_id"]), x0, y0)
    return _canvas_png(canvas, texts)


def _confusion_card(canvas: np.ndarray, k: int, c: Mapping[str, Any], names: Mapping[int, str],
                    imgs: list[np.ndarray], ref: np.ndarray | None, x0: float, y0: float) -> list[_Text]:
    """One confusion: its heading, up to four misclassified examples, an arrow, the predicted class."""
    texts: list[_Text] = [(x0, y0 + _HEAD - 22, f"#{k + 1}   {c['count']:,}x, {pct(c['rate'], 1)} of the class",
                           {"fontsize": 8, "color": INK, "fontweight": "bold"})]
    pair = (f"true {c['true_id']}: {_short(names.get(c['true_id'], c['true']), 24)}  \u2192  predicted "
            f"{c['predicted_id']}: {_short(names.get(c['predicted_id'], c['predicted']), 24)}")
    texts.append((x0, y0 + _HEAD - 7, pair, {"fontsize": 7.5, "color": INK}))
    ty = y0 + _HEAD
    ids = c.get("example_keys") or c.get("examples") or []
    for j, img in enumerate(imgs[:4]):
        x = x0 + j * (_TILE + _GAP)
        _paste(canvas, img, x, ty, _TILE, BAD)
        if j < len(ids):
            texts.append((x + _TILE / 2, ty + _TILE + 13, _tail(str(ids[j]).rsplit("/", 1)[-1], 15),
                          {"fontsize": 6.5, "color": MUTED, "ha": "center"}))
    ax_x = x0 + 4 * (_TILE + _GAP) - _GAP + _ARROW_W / 2
    texts.append((ax_x, ty + _TILE / 2 + 8, "\u2192", {"fontsize": 18, "color": MUTED, "ha": "center"}))
    rx = x0 + 4 * (_TILE + _GAP) - _GAP + _ARROW_W
    if ref is not None:
        _paste(canvas, ref, rx, ty, _TILE, GOOD)
        texts.append((rx + _TILE / 2, ty + _TILE + 13, "predicted class", {"fontsize": 6.5, "color": MUTED,
                                                                          "ha": "center"}))
    else:
        _paste(canvas, np.full((8, 8, 3), 242, dtype=np.uint8), rx, ty, _TILE, "#d5dbe1")
        texts.append((rx + _TILE / 2, ty + _TILE / 2 + 4, "no correct\nexample",
                      {"fontsize": 6.5, "color": MUTED, "ha": "center", "va": "center"}))
    return texts


def _canvas_png(canvas: np.ndarray, texts: list[_Text]) -> bytes:
    """One imshow of the whole canvas, the text laid over it in pixel coordinates."""
    height, width = canvas.shape[:2]
    fig = _figure(width / DPI, height / DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest", extent=(0, width, height, 0))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    for x, y, text, kw in texts:
        ax.text(x, y, text, **kw)
    return _png(fig)


def _paste(canvas: np.ndarray, img: np.ndarray, x: int, y: int, size: int, edge: str) -> None:
    """Draw ``img`` scaled to size x size at (x, y) in ``canvas``, framed in ``edge``."""
    from matplotlib.colors import to_rgb
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(np.asarray(img, dtype=np.uint8)))
    # small crops are enlarged with visible pixels (what the model saw), large ones reduced smoothly
    im = im.resize((size, size), Image.NEAREST if max(im.size) <= size else Image.LANCZOS)
    frame = np.array([round(255 * v) for v in to_rgb(edge)], dtype=np.uint8)
    b = 3
    canvas[y - b:y + size + b, x - b:x + size + b] = frame
    canvas[y:y + size, x:x + size] = np.asarray(im)


def reliability_png(metrics: Mapping[str, Any]) -> bytes:
    """Reliability diagram: accuracy against confidence per bin, and how many samples each bin holds."""
    cal = metrics["calibration"]
    bins = cal["reliability"]
    width = 1.0 / cal["bins"]
    fig = _figure(6.4, 6.2)
    top = fig.add_axes((0.13, 0.36, 0.82, 0.56))
    low = fig.add_axes((0.13, 0.09, 0.82, 0.19), sharex=top)
    used = [b for b in bins if b["count"]]
    centres = [(b["lo"] + b["hi"]) / 2 for b in used]
    acc = [b["accuracy"] for b in used]
    conf = [b["confidence"] for b in used]
    top.plot([0, 1], [0, 1], color=MUTED, linestyle="--", linewidth=1, label="perfect calibration")
    top.bar(centres, acc, width=width * 0.94, color=ACCENT, alpha=0.85, label="accuracy in bin")
    gaps = [a - c for a, c in zip(acc, conf)]
    top.bar(centres, [-g for g in gaps], bottom=acc, width=width * 0.94, color="none", edgecolor=BAD,
            hatch="////", linewidth=0.8, label="gap to mean confidence")
    before = cal.get("uncalibrated")
    calibrated = cal.get("temperature", 1.0) != 1.0 or cal.get("tta")
    if before and calibrated:  # the plain network (T = 1): the same bins, as points, to show the change
        pts = [b for b in before["reliability"] if b["count"]]
        top.plot([b["confidence"] for b in pts], [b["accuracy"] for b in pts], color=BAD, marker="o", markersize=3,
                 linewidth=1, label=f"before calibration (T=1): ECE {pct(before['ece'])}")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy", fontsize=9, color=INK)
    temp = f", T={cal['temperature']:.3g}" if calibrated else ""
    top.set_title(f"Reliability ({cal['bins']} bins{temp}): ECE {pct(cal['ece'])}, mean confidence "
                  f"{pct(metrics['overall']['mean_confidence'])}, top-1 {pct(metrics['overall']['top1'])}",
                  fontsize=10, color=INK, loc="left")
    top.legend(loc="upper left", fontsize=8, frameon=False)
    top.tick_params(labelbottom=False)
    counts = [b["count"] for b in bins]
    low.bar([(b["lo"] + b["hi"]) / 2 for b in bins], counts, width=width * 0.94, color="#9aa5b1")
    if max(counts, default=0) > 0:
        low.set_yscale("log")
    low.set_ylabel("samples", fontsize=9, color=INK)
    low.set_xlabel("confidence (top softmax probability)", fontsize=9, color=INK)
    for ax in (top, low):
        _style(ax)
        ax.grid(axis="y", color="#e4e7eb", linewidth=0.6)
        ax.set_axisbelow(True)
    top.yaxis.set_major_formatter(_percent_formatter())
    low.xaxis.set_major_formatter(_percent_formatter())
    return _png(fig)


def risk_coverage_png(metrics: Mapping[str, Any]) -> bytes:
    """Selective prediction: the error among the answered images as the model answers fewer of them."""
    sel = metrics["selective"]
    cov = [p["coverage"] for p in sel["curve"]]
    risk = [p["risk"] for p in sel["curve"]]
    fig = _figure(6.4, 3.6)
    ax = fig.add_axes((0.13, 0.16, 0.82, 0.72))
    ax.plot(cov, risk, color=ACCENT, linewidth=1.5, label="error of the answered images")
    for c in sel["coverages"]:
        e = sel["error_at"][str(c)]
        if e is not None:
            ax.plot([c], [e], "o", color=BAD, markersize=4)
            ax.annotate(f"{pct(e)} at {c:.0%}\n(confidence >= {sel['threshold_at'][str(c)]:.3f})", (c, e),
                        textcoords="offset points", xytext=(-8, 10), ha="right", fontsize=8, color=INK)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max([*risk, 1e-3]) * 1.15)
    ax.set_xlabel("coverage (share of images answered, most confident first)", fontsize=9, color=INK)
    ax.set_ylabel("error", fontsize=9, color=INK)
    ax.set_title(f"Risk-coverage: AURC {num(sel['aurc'], '.4f')}", fontsize=10, color=INK, loc="left")
    _style(ax)
    ax.grid(color="#e4e7eb", linewidth=0.6)
    ax.xaxis.set_major_formatter(_percent_formatter())
    ax.yaxis.set_major_formatter(_percent_formatter())
    return _png(fig)


def robustness_png(metrics: Mapping[str, Any]) -> bytes:
    """Accuracy per corruption x severity, with each corruption's mean and the clean accuracy."""
    rob = metrics["robustness"]
    kinds, sevs = rob["corruptions"], rob["severities"]
    with_mean = len(sevs) > 1  # with one severity the mean column would repeat it
    grid = np.full((len(kinds), len(sevs) + with_mean), np.nan)
    for r in rob["results"]:
        if r["accuracy"] is not None:
            grid[kinds.index(r["corruption"]), sevs.index(r["severity"])] = r["accuracy"]
    if with_mean:
        for i, k in enumerate(kinds):
            v = rob["per_corruption"].get(k)
            grid[i, -1] = np.nan if v is None else v
    fig = _figure(max(6.0, 2.2 + 0.95 * grid.shape[1]), 1.3 + 0.42 * len(kinds))
    ax = fig.add_axes((0.22, 0.14, 0.7, 0.72))
    cmap = _cmap("RdYlGn").with_extremes(bad="#eceff3")
    ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    for (i, j), v in np.ndenumerate(grid):
        if np.isfinite(v):
            ax.text(j, i, f"{100 * v:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if v < 0.25 or v > 0.85 else INK, fontweight="bold" if j == len(sevs) else None)
    if with_mean:
        ax.axvline(len(sevs) - 0.5, color="white", linewidth=3)
    ax.set_xticks(range(grid.shape[1]), [f"severity {s}" for s in sevs] + ["mean"] * with_mean, fontsize=8,
                  color=INK)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=9, color=INK)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    ax.set_title(f"Accuracy (%) under corruptions: mCA {pct(rob['mca'])}, clean top-1 {pct(rob['clean_top1'])}",
                 fontsize=10, color=INK, loc="left")
    return _png(fig)


def _cmap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name]


def _percent_formatter() -> Any:
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(1.0, decimals=0)


# ---------------------------------------------------------------------------------------------
# Numbers as the report writes them (the page uses the same two)


def pct(x: float | None, digits: int = 2) -> str:
    """A share as a percentage; "n/a" for a metric that has no value (a class without samples)."""
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}%"


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 1] + "\u2026"


def _tail(s: str, n: int) -> str:
    """The end of a long key: file names differ at the end (00012/00003_00029.ppm)."""
    return s if len(s) <= n else "\u2026" + s[-(n - 1):]


def num(x: Any, spec: str = ",") -> str:
    """A number in ``spec``; "n/a" for a metric that has no value."""
    return "n/a" if x is None else format(x, spec)
