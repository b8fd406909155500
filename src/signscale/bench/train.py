"""``signscale bench train``: training samples/s and peak memory per model x precision on this machine."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from signscale.bench import report


@dataclass(frozen=True)
class BenchTrainConfig:
    """``signscale bench train``: training samples/s and peak memory per model x precision."""

    data: str = ""  # packed dataset URL; empty: a synthetic set is packed in a temp folder
    models: tuple[str, ...] = ("small_cnn", "msnet", "stn_msnet", "resnet18_small")
    precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")
    steps: int = 30
    batch_size: int = 256
    channels_last: bool = True
    device: str = "auto"
    workers: int = 1


def bench_train(cfg: BenchTrainConfig, *, console: Console | None = None) -> list[dict[str, Any]]:
    """Each model x precision trains ``steps`` steps in its own process (so peak memory is its own)."""
    import subprocess
    import sys

    con = console or report.console_for_tables()
    tmp = tempfile.mkdtemp(prefix="signscale-bench-train-")
    try:
        data = cfg.data
        if not data:
            from signscale.data.pack import PackConfig, pack

            data = os.path.join(tmp, "data")
            pack(PackConfig(source=f"synthetic:?n={cfg.batch_size * 12}&size=32", out=data, workers=0,
                            progress=False))
        rows = []
        for model in cfg.models:
            for prec in cfg.precisions:
                out = os.path.join(tmp, f"{model}-{prec}")
                cmd = [sys.executable, "-m", "signscale", "train", f"--data={data}", f"--model={model}",
                       f"--precision={prec}", f"--max-steps={cfg.steps}", f"--batch-size={cfg.batch_size}",
                       f"--channels-last={str(cfg.channels_last).lower()}", f"--device={cfg.device}",
                       f"--workers={cfg.workers}", f"--out={out}", "--progress=false", "--ema=0"]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    rows.append({"model": model, "precision": prec, "error": proc.stderr.strip()[-300:]})
                    continue
                res = json.loads(open(os.path.join(out, "result.json")).read())
                rows.append({"model": model, "precision": prec, "samples_per_s": res["samples_per_s"],
                             "peak_memory_mb": res["peak_memory_mb"], "params": res["params"], "macs": res["macs"]})
                con.print(f"  {model:16s} {prec:5s} {res['samples_per_s']:8,.0f} samples/s  "
                          f"peak {res['peak_memory_mb']:8,.0f} MB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table = Table(title=f"bench train: {cfg.steps} steps, batch {cfg.batch_size}, device {cfg.device}, "
                        f"channels_last={cfg.channels_last}")
    for col in ("model", "params", "MACs", "precision", "samples/s", "vs fp32", "peak MB", "vs fp32 mem"):
        table.add_column(col, justify="left" if col in ("model", "precision") else "right")
    for r in rows:
        if "error" in r:
            table.add_row(r["model"], "", "", r["precision"], "failed", "", "", r["error"][:60])
            continue
        base = next((b for b in rows if b["model"] == r["model"] and b["precision"] == "fp32" and "error" not in b),
                    None)
        table.add_row(r["model"], f"{r['params'] / 1e6:.2f}M", f"{r['macs'] / 1e6:.0f}M", r["precision"],
                      f"{r['samples_per_s']:,.0f}",
                      f"{r['samples_per_s'] / base['samples_per_s']:.2f}x" if base else "",
                      f"{r['peak_memory_mb']:,.0f}",
                      f"{r['peak_memory_mb'] / base['peak_memory_mb']:.2f}x" if base else "")
    con.print(table)
    con.print("peak memory: CUDA max_memory_allocated on a GPU, the process's peak RSS on a CPU "
              "(which includes the Python runtime and the loader)")
    return rows
