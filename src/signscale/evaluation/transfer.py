"""The transfer matrix: models trained on each country (and on their merge) scored on every country's data.

Papers say models degrade across regions; this measures by how much, per pair, on the meanings the
model and the data share. Each cell is one :func:`signscale.evaluation.evaluate.evaluate` run: the data's
classes map onto the model's outputs by (country, id) where the model was trained on that country
and by semantic key otherwise (:func:`signscale.evaluation.evaluate.label_map`), and samples of classes the
model has no output for are counted as skipped, never scored. So a cell reads "accuracy over the
N images whose meaning this model knows", and the matrix keeps N beside every number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from signscale import config as config_mod
from signscale import storage
from signscale.evaluation.evaluate import EvalConfig, evaluate


@dataclass(frozen=True)
class TransferConfig:
    models: dict[str, str] = field(default_factory=dict)  # row name -> model artefact URL
    data: dict[str, str] = field(default_factory=dict)  # column name -> packed dataset URL or source spec
    out: str = ""  # folder for transfer.json, transfer.md and transfer.png (empty: write nothing)
    batch_size: int = 512
    workers: int = 1
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.models or not self.data:
            raise config_mod.ConfigError("models and data: give at least one NAME=URL of each, e.g. "
                                         "--model de=runs/de/model --data cn=data/tsrd/val")


@dataclass
class TransferResult:
    models: list[str]
    data: list[str]
    cells: dict[str, dict[str, dict[str, Any]]]  # model -> data -> {accuracy, scored, skipped, classes}
    files: dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        """A markdown table: accuracy (images scored) per model x data."""
        head = "| model \\ data | " + " | ".join(self.data) + " |"
        rule = "|---|" + "---|" * len(self.data)
        rows = [f"| {m} | " + " | ".join(_cell(self.cells[m][d]) for d in self.data) + " |" for m in self.models]
        return "\n".join([head, rule, *rows])

    def summary(self) -> str:
        best = {d: max(self.models, key=lambda m: self.cells[m][d]["accuracy"] or -1) for d in self.data}
        return (f"transfer matrix of {len(self.models)} model(s) x {len(self.data)} dataset(s); best per dataset: "
                + ", ".join(f"{d}: {m} {_pct(self.cells[m][d]['accuracy'])}" for d, m in best.items()))


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2%}"


def _cell(c: dict[str, Any]) -> str:
    if c.get("error"):
        return "no shared class"
    return f"{_pct(c['accuracy'])} ({c['scored']:,} of {c['scored'] + c['skipped']:,}; {c['classes']} classes)"


def transfer_matrix(cfg: TransferConfig) -> TransferResult:
    from signscale.evaluation.evaluate import EvalError

    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for name, model in cfg.models.items():
        cells[name] = {}
        for dname, data in cfg.data.items():
            try:
                rep = evaluate(EvalConfig(model=model, data=data, batch_size=cfg.batch_size, workers=cfg.workers,
                                          progress=cfg.progress))
            except EvalError as exc:
                cells[name][dname] = {"accuracy": None, "scored": 0, "skipped": 0, "classes": 0, "error": str(exc)}
                continue
            m = rep.metrics
            cells[name][dname] = {"accuracy": m["overall"]["top1"], "scored": m["overall"]["count"],
                                  "skipped": sum(m["skipped"]["classes_not_in_model"].values()),
                                  "classes": sum(1 for c in m["classes"] if c["support"] > 0),
                                  "mapping": m["data"]["label_mapping"]}
    result = TransferResult(list(cfg.models), list(cfg.data), cells)
    if cfg.out:
        result.files = _write(result, cfg.out)
    return result


def _write(result: TransferResult, out: str) -> dict[str, str]:
    files = {"json": storage.join(out, "transfer.json"), "markdown": storage.join(out, "transfer.md"),
             "png": storage.join(out, "transfer.png")}
    storage.write_bytes(files["json"], json.dumps({"models": result.models, "data": result.data,
                                                   "cells": result.cells}, indent=2).encode())
    storage.write_bytes(files["markdown"], (result.table() + "\n").encode())
    storage.write_bytes(files["png"], _heatmap(result))
    return files


def _heatmap(result: TransferResult) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    acc = np.array([[result.cells[m][d]["accuracy"] if result.cells[m][d]["accuracy"] is not None else np.nan
                     for d in result.data] for m in result.models], dtype=float)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(result.data), 1.2 + 0.8 * len(result.models)))
    ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn")
    ax.set_xticks(range(len(result.data)), [f"data: {d}" for d in result.data])
    ax.set_yticks(range(len(result.models)), [f"model: {m}" for m in result.models])
    for i, m in enumerate(result.models):
        for j, d in enumerate(result.data):
            c = result.cells[m][d]
            text = "no shared\nclass" if c["accuracy"] is None else f"{c['accuracy']:.1%}\n{c['scored']:,} imgs"
            ax.text(j, i, text, ha="center", va="center", fontsize=9)
    ax.set_title("accuracy over the meanings model and data share")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()
