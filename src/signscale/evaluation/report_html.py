"""An evaluation report people can read: ``metrics.json``, five PNG charts and one ``report.html``.

Rendering only, like :mod:`signscale.reports`: the caller passes the metrics dict of an
:class:`~signscale.evaluation.evaluate.EvalReport` (the stable JSON of docs/evaluation.md) and the few arrays
the JSON does not hold (example images); nothing here reads models or data.

``report.html`` is self-contained: its charts are the same PNG bytes as the files beside it,
embedded as ``data:image/png;base64`` URIs, and its styles are inline, so the one file can be
mailed, attached to a CI run or opened offline. The charts are drawn by
:mod:`signscale.evaluation.report_charts`; this module writes them and lays out the page.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from signscale import storage
from signscale.evaluation.report_charts import PNG_NAMES, num, pct, render_charts

__all__ = ["PNG_NAMES", "render_charts", "render_html", "write_report"]


def write_report(out: str, metrics: Mapping[str, Any], *, example_images: Sequence[Sequence[np.ndarray]] = (),
                 class_images: Mapping[int, np.ndarray] | None = None) -> dict[str, str]:
    """Write metrics.json, the PNGs and report.html into ``out`` (any storage URL); returns name -> URL.

    ``example_images[i]`` are uint8 HxWx3 images of ``metrics["top_confusions"][i]``;
    ``class_images[c]`` one correctly classified image of class id ``c`` (the "looks like" picture).
    """
    out = out.rstrip("/")
    storage.makedirs(out)
    files: dict[str, str] = {}
    files["metrics"] = storage.join(out, "metrics.json")
    storage.write_bytes(files["metrics"], (json.dumps(metrics, indent=2, allow_nan=False) + "\n").encode("utf-8"))
    charts = render_charts(metrics, example_images=example_images, class_images=class_images or {})
    for name, png in charts.items():
        url = storage.join(out, f"{name}.png")
        storage.write_bytes(url, png)
        files[name] = url
    url = storage.join(out, "report.html")
    storage.write_bytes(url, render_html(metrics, charts).encode("utf-8"))
    files["report"] = url
    return files


# ---------------------------------------------------------------------------------------------
# HTML


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


CSS = """
:root { --ink:#1f2933; --muted:#6b7785; --line:#e4e7eb; --accent:#2f6db3; --bad:#c8372d; --good:#2e8b57; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); background: #f5f7fa; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; min-height: 100vh; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 14px; margin: 18px 0 6px; }
.sub { color: var(--muted); margin: 0 0 18px; word-break: break-all; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(106px, 1fr)); gap: 10px; margin: 14px 0; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; background: #fbfcfd; }
.card .v { font-size: 20px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .k { color: var(--muted); font-size: 12px; }
.card.warn .v { color: var(--bad); }
table { border-collapse: collapse; width: 100%; margin: 6px 0 12px; font-size: 13px; }
th, td { padding: 4px 8px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: #f0f3f7; font-weight: 600; position: sticky; top: 0; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:nth-child(even) td { background: #fafbfc; }
table.kv td:first-child { color: var(--muted); width: 130px; }
table.narrow { width: auto; min-width: 520px; }
td code, .sub code { font-size: 12px; }
figure { margin: 12px 0 22px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 4px; }
.bar { display: inline-block; height: 9px; border-radius: 2px; vertical-align: middle; margin-right: 6px; }
.bad { color: var(--bad); font-weight: 600; }
.cols { display: grid; grid-template-columns: 1fr 1fr; gap: 22px; }
@media (max-width: 900px) { .cols { grid-template-columns: 1fr; } }
details { margin: 8px 0; } pre { background: #f5f7fa; padding: 10px; overflow-x: auto; font-size: 12px; }
footer { color: var(--muted); font-size: 12px; margin-top: 40px; }
"""


def _img(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool] = (), cls: str = "") -> str:
    numeric = list(numeric) + [False] * (len(head) - len(numeric))
    th = "".join(f'<th class="n">{_e(h)}</th>' if n else f"<th>{_e(h)}</th>" for h, n in zip(head, numeric))
    body = "".join("<tr>" + "".join(f'<td class="n">{c}</td>' if n else f"<td>{c}</td>" for c, n in zip(r, numeric))
                   + "</tr>" for r in rows)
    thead = f"<thead><tr>{th}</tr></thead>" if any(head) else ""
    return f'<table class="{cls}">{thead}<tbody>{body}</tbody></table>'


def _acc_bar(x: float | None) -> str:
    """A small inline bar and the percentage: scannable without a chart."""
    if x is None:
        return "n/a"
    hue = int(120 * max(0.0, min(1.0, (x - 0.5) / 0.5)))  # red below 50%, green at 100%
    return f'<span class="bar" style="width:{max(1, round(60 * x))}px;background:hsl({hue},55%,48%)"></span>{pct(x)}'


def render_html(metrics: Mapping[str, Any], charts: Mapping[str, bytes]) -> str:
    """The self-contained report page (charts as data URIs).

    One function per section, in the page's order, so a section can be read and changed on its own;
    a section whose data the metrics lack (no robustness run, no selective curve) adds nothing.
    """
    m = metrics
    title = _title(m)
    parts = [*_heading(m, title), _model_and_run(m), *_per_class(m, charts), *_confusions(m, charts),
             *_calibration(m, charts), *_selective(m, charts), *_groups(m), *_robustness(m, charts), *_skipped(m),
             *_colophon(m)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
            + "\n".join(parts) + "</main></body></html>\n")


def _title(m: Mapping[str, Any]) -> str:
    """What was evaluated on what: the page's heading and its browser tab."""
    model, data = m["model"], m["data"]
    return f"Evaluation of {model.get('name', 'model')} on {data.get('name') or data.get('spec')}"


def _heading(m: Mapping[str, Any], title: str) -> list[str]:
    """The title, where model and data came from, and the headline numbers as cards (a reader's first look)."""
    model, data = m["model"], m["data"]
    cards = "".join(f'<div class="card{" warn" if warn else ""}"><div class="v">{_e(v)}</div>'
                    f'<div class="k">{_e(k)}</div></div>' for k, v, warn in _cards(m))
    return [f"<h1>{_e(title)}</h1>",
            (f'<p class="sub">model <code>{_e(model.get("url"))}</code> &middot; data <code>{_e(data.get("spec"))}'
             f'</code> &middot; {_e(m.get("created", ""))}</p>'),
            '<div class="cards">' + cards + "</div>"]


def _cards(m: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(label, value, warn) of each headline card; skipped entries are a warning, as they are in no metric."""
    o, run, skipped, rob = m["overall"], m["run"], m["skipped"], m.get("robustness")
    cards = [
        ("top-1 accuracy", pct(o["top1"]), False),
        ("top-5 accuracy", pct(o["top5"]), False),
        ("macro-F1", num(o["macro_f1"], ".4f"), False),
        ("balanced accuracy", pct(o["balanced_accuracy"]), False),
        ("ECE (15 bins)", pct(o["ece"]), False),
    ]
    if o.get("error_at_99_coverage") is not None:
        cards.append(("error at 99% coverage", pct(o["error_at_99_coverage"]), False))
    if rob:
        cards.append(("mean corruption acc. (mCA)", pct(rob["mca"]), False))
    cards += [("images scored", f"{o['count']:,}", False), ("skipped", f"{skipped['total']:,}", skipped["total"] > 0),
              ("images / s", f"{run['images_per_s']:,.0f}", False)]
    return cards


def _model_and_run(m: Mapping[str, Any]) -> str:
    """Two tables side by side: which model (artefact, checksum, preprocessing) and which data and run.

    Enough to reproduce the numbers: a report without them cannot be compared with another.
    """
    model, data, run = m["model"], m["data"], m["run"]
    sha = model.get("sha256") or ""
    return '<div class="cols"><div><h3>Model</h3>' + _table(["", ""], [
        ["artefact", f"<code>{_e(model.get('url'))}</code>"], ["sha256", f"<code>{_e(sha[:16])}&hellip;</code>"],
        ["architecture", _e(f"{model.get('name')} ({num(model.get('params'))} parameters)")],
        ["label space", _e(f"{model.get('label_space')} ({model.get('num_classes')} classes)")],
        ["preprocessing", f"<code>{_e(json.dumps(model.get('preprocess')))}</code>"],
    ], cls="kv") + "</div><div><h3>Data and run</h3>" + _table(["", ""], [
        ["data", f"<code>{_e(data.get('spec'))}</code> ({_e(data.get('kind'))})"],
        ["entries", _e(f"{data.get('entries', 0):,} = {data.get('scored', 0):,} scored + "
                       f"{data.get('skipped', 0):,} skipped")],
        ["label mapping", _e(f"{data.get('label_mapping')} (data: {data.get('label_space')})")],
        ["checksum", f"<code>{_e((data.get('checksum') or '-')[:16])}</code>"],
        ["run", _e(f"{run['world_size']} process(es) on {run['device']}, {run['precision']}, batch "
                   f"{run['batch_size']}, {run['seconds']:.1f} s")],
    ], cls="kv") + "</div></div>"


def _per_class(m: Mapping[str, Any], charts: Mapping[str, bytes]) -> list[str]:
    """The per-class chart and table; each row also names the class it is most often taken for (where its errors go)."""
    parts = ["<h2>Per class</h2>"]
    if "per_class" in charts:
        parts.append(_img(charts["per_class"], "per-class recall and precision",
                          "Recall (bar) is the share of a class's images classified correctly; the black tick is "
                          "precision, the share of predictions of that class that were right."))
    worst_into = _worst_confusion_by_class(m)
    rows = []
    for c in m["classes"]:
        into = worst_into.get(c["id"])
        rows.append([str(c["id"]), f"<code>{_e(c['key'])}</code>", _e(c["name"]), f"{c['support']:,}",
                     pct(c["precision"]), _acc_bar(c["recall"]), num(c["f1"], ".4f"),
                     _e(f"{into[1]}x {into[0]}") if into else ""])
    parts.append(_table(["id", "key", "name", "support", "precision", "recall", "F1", "most often taken for"], rows,
                        [True, False, False, True, True, True, True, False]))
    return parts


def _confusions(m: Mapping[str, Any], charts: Mapping[str, bytes]) -> list[str]:
    """The confusion matrix, the most frequent confusions with examples, and their table with sample ids."""
    parts = ["<h2>Confusions</h2>"]
    if "confusion" in charts:
        parts.append(_img(charts["confusion"], "confusion matrix",
                          "Rows are true classes, columns predictions; each row is normalised to 100%."))
    if "confusions" in charts:
        parts.append(_img(charts["confusions"], "most frequent confusions with example images",
                          "Examples are chosen by a fixed scramble of their sample ids, so the same ones appear "
                          "in every run, whatever the batch size or number of processes."))
    parts.append(_table(["#", "true", "predicted", "count", "share of true class", "examples (sample ids)"],
                        [[str(i + 1), f"<code>{_e(c['true'])}</code>", f"<code>{_e(c['predicted'])}</code>",
                          f"{c['count']:,}", pct(c["rate"]),
                          _e(", ".join(map(str, c.get("example_keys") or c["examples"])))]
                         for i, c in enumerate(m.get("top_confusions", []))], [True, False, False, True, True, False]))
    return parts


def _calibration(m: Mapping[str, Any], charts: Mapping[str, bytes]) -> list[str]:
    """The reliability diagram and, when known, how scoring changed ECE and NLL from the plain network's.

    The sentence says how the scores were calibrated, or how to calibrate a model that never was.
    """
    parts = ["<h2>Calibration</h2>"]
    if "reliability" in charts:
        parts.append(_img(charts["reliability"], "reliability diagram",
                          "A calibrated model's bars follow the diagonal: of the images it is 90% sure about, 90% "
                          "are right. ECE is the sample-weighted mean gap."))
    cal = m["calibration"]
    if cal.get("uncalibrated"):
        fitted = cal.get("fitted") or {}
        how = (f"temperature {cal.get('temperature', 1.0):.4g}"
               + (f", fitted on {fitted.get('count', 0):,} images of <code>{_e(fitted.get('data'))}</code>"
                  if fitted else " (the model was never calibrated: `signscale calibrate MODEL VALIDATION_DATA`)")
               + (", with flip-rule test-time augmentation" if cal.get("tta") else ""))
        parts.append(f"<p>Scored with {how}. ECE {pct(cal['uncalibrated']['ece'])} &rarr; {pct(cal['ece'])}, "
                     f"NLL {num(cal['uncalibrated']['nll'], '.4f')} &rarr; {num(m['overall']['nll'], '.4f')}.</p>")
    return parts


def _selective(m: Mapping[str, Any], charts: Mapping[str, bytes]) -> list[str]:
    """Risk-coverage: the error left when the model answers only its surest images, and the threshold to set."""
    sel = m.get("selective")
    if not sel:
        return []
    parts = ["<h2>Knowing when unsure</h2>"]
    if "risk_coverage" in charts:
        parts.append(_img(charts["risk_coverage"], "risk-coverage curve",
                          "Answer only the images the model is most sure of: the error of those answered, by the "
                          "share answered. The confidence shown is the --min-confidence that keeps that share."))
    parts.append(_table(["coverage", "error", "min. confidence"],
                        [[f"{c:.0%}", pct(sel["error_at"][str(c)]), num(sel["threshold_at"][str(c)], ".4f")]
                         for c in sel["coverages"]] + [["100%", pct(1 - m["overall"]["top1"]), "0"]],
                        [True, True, True], cls="narrow"))
    return parts


def _groups(m: Mapping[str, Any]) -> list[str]:
    """Accuracy by condition, source and country, and signs taken for another country's design.

    An overall number can hide a weak slice (a condition, a source, a country); these tables show it.
    """
    parts = ["<h2>By condition, source and country</h2>"]
    for label, key in (("condition", "conditions"), ("source", "sources"), ("country", "countries")):
        groups = m.get(key) or {}
        if groups:
            parts.append(f"<h3>{_e(label.capitalize())}</h3>" + _table(
                [label, "images", "correct", "accuracy"],
                [[_e(k), f"{g['count']:,}", f"{g['correct']:,}", _acc_bar(g["accuracy"])] for k, g in groups.items()],
                [False, True, True, True], cls="narrow"))
    cross = m.get("cross_country_confusions") or []
    if cross:
        parts.append("<h3>Confusions across countries</h3><p>Mistakes whose predicted class belongs to no country "
                     "of the true class: a sign taken for another country's design.</p>" + _table(
                         ["true", "countries", "predicted as", "countries", "images"],
                         [[_e(c["true"]), _e(",".join(c["true_countries"])), _e(c["predicted"]),
                           _e(",".join(c["predicted_countries"])), f"{c['count']:,}"] for c in cross],
                         [False, False, False, False, True], cls="narrow"))
    return parts


def _robustness(m: Mapping[str, Any], charts: Mapping[str, bytes]) -> list[str]:
    """Accuracy per corruption and severity, when the evaluation ran corruptions; mCA against clean top-1."""
    rob = m.get("robustness")
    if not rob:
        return []
    parts = ["<h2>Robustness to corruptions</h2>"]
    if "robustness" in charts:
        parts.append(_img(charts["robustness"], "accuracy per corruption and severity",
                          f"Each image corrupted deterministically (seed {rob['seed']}); mCA is the mean over all "
                          f"corruption x severity cells."))
    sevs = rob["severities"]
    acc = {(r["corruption"], r["severity"]): r["accuracy"] for r in rob["results"]}
    mean = ["mean"] if len(sevs) > 1 else []  # with one severity the mean column would repeat it
    parts.append(_table(["corruption", *[f"severity {s}" for s in sevs], *mean],
                        [[_e(k), *[_acc_bar(acc.get((k, s))) for s in sevs],
                          *[_acc_bar(rob["per_corruption"][k])] * len(mean)] for k in rob["corruptions"]],
                        [False, *[True] * (len(sevs) + len(mean))], cls="narrow"))
    parts.append(f"<p>mCA {pct(rob['mca'])} against clean top-1 {pct(rob['clean_top1'])} "
                 f"(relative {pct(rob['relative_mca'])}); {rob['seconds']:.1f} s.</p>")
    return parts + _by_brightness(rob.get("by_brightness"))


def _by_brightness(light: Mapping[str, Any] | None) -> list[str]:
    """The same accuracies by the clean image's brightness: whether a fault fails on the images that
    were already dark (little signal left under its noise) or everywhere (a shift the model never saw)."""
    if not light:
        return []
    edges, counts = light["edges"], light["count"]
    head = ["", *[f"{lo:.1f}-{hi:.1f} ({n:,})" for lo, hi, n in zip(edges, edges[1:], counts)]]
    rows = [["clean", *[_acc_bar(a) for a in light["clean"]]]]
    rows += [[_e(f"{r['corruption']} {r['severity']}"), *[_acc_bar(a) for a in r["accuracy"]]]
             for r in light["results"]]
    return ["<h3>By the clean image's brightness</h3>",
            "<p>Columns: the mean brightness of the image before the corruption (0 black, 1 white) and how "
            "many images fall in it.</p>",
            _table(head, rows, [False, *[True] * len(counts)], cls="narrow")]


def _skipped(m: Mapping[str, Any]) -> list[str]:
    """Entries that were not scored, by reason and with examples: counted in no metric, so shown here.

    Said even when there are none, so a reader knows every entry was scored rather than wondering.
    """
    skipped = m["skipped"]
    parts = ["<h2>Skipped entries</h2>"]
    if not skipped["total"]:
        return [*parts, "<p>None: every entry of the data was scored.</p>"]
    parts.append(f'<p class="bad">{skipped["total"]:,} entries were not scored. They are counted here and in no '
                 "metric above.</p>")
    parts.append(_table(["reason", "entries"], [[f"<code>{_e(k)}</code>", f"{v:,}"]
                                                for k, v in skipped["by_reason"].items()], [False, True],
                        cls="narrow"))
    if skipped.get("at_pack"):
        parts.append("<p>Of these, quarantined when the dataset was packed: "
                     + _e(", ".join(f"{k}={v}" for k, v in skipped["at_pack"].items())) + ".</p>")
    if skipped.get("classes_not_in_model"):
        parts.append("<p>Classes of the data that the model does not know: "
                     + _e(", ".join(f"{k} ({v})" for k, v in skipped["classes_not_in_model"].items())) + ".</p>")
    if skipped.get("examples"):
        parts.append("<h3>Examples</h3>" + _table(["entry", "reason", "detail"], [
            [f"<code>{_e(s['key'])}</code>", _e(s["reason"]), _e(s["detail"])] for s in skipped["examples"]]))
    return parts


def _colophon(m: Mapping[str, Any]) -> list[str]:
    """The evaluation's config (folded) and the format version: which run, and that metrics.json holds the numbers."""
    return ["<details><summary>Evaluation config</summary><pre>" + _e(json.dumps(m.get("config"), indent=2))
            + "</pre></details>",
            f"<footer>{_e(m.get('format'))} version {_e(m.get('version'))}, signscale "
            f"{_e(m.get('signscale_version'))}. Numbers here are those of metrics.json beside this file.</footer>"]


def _worst_confusion_by_class(m: Mapping[str, Any]) -> dict[int, tuple[str, int]]:
    """True class id -> (key of the class it is most often predicted as, count), from the confusion matrix."""
    cm = np.asarray(m["confusion"]["matrix"], dtype=np.int64)
    labels = m["confusion"]["labels"]
    out: dict[int, tuple[str, int]] = {}
    if cm.size == 0:
        return out
    off = cm.copy()
    np.fill_diagonal(off, 0)
    for t in range(off.shape[0]):
        p = int(off[t].argmax())
        if off[t, p] > 0:
            out[t] = (labels[p], int(off[t, p]))
    return out
