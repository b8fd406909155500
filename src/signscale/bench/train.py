"""``signscale bench train``: training samples/s and peak memory per model x precision on this machine;
with ``--vs-peer``, seconds to a target held-out accuracy for the plain PyTorch peer (:mod:`.peer`)
and for signscale's recipe, trained one after the other in the same command with the same threads."""

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
from signscale.config import ConfigError, Precision, check_precision


@dataclass(frozen=True)
class BenchTrainConfig:
    """``signscale bench train``: training samples/s and peak memory per model x precision."""

    data: str = ""  # packed dataset URL; empty: a synthetic set is packed in a temp folder
    models: tuple[str, ...] = ("small_cnn", "msnet", "stn_msnet", "resnet18_small")  # models to measure
    precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")  # precisions to measure each model in
    steps: int = 30  # training steps per model x precision
    batch_size: int = 256  # per step (with --vs-peer: the recipe's; the peer's is 128)
    channels_last: bool = True
    device: str = "auto"
    workers: int = 1  # loader worker processes (with --vs-peer: each recipe gets as many)
    # instead: seconds to --target accuracy on --val, the plain PyTorch peer (bench/peer.py) vs the recipe
    vs_peer: bool = False
    val: str = ""  # --vs-peer: the held-out packed dataset both are scored on (with --data; neither: synthetic)
    target: float = 0.99  # --vs-peer: the held-out accuracy to reach
    model: str = "stn_msnet"  # --vs-peer: the recipe's model (the record recipe's, at 15 epochs: a time-to-target race)
    precision: Precision = "bf16"  # --vs-peer: the recipe's precision
    epochs: int = 15  # --vs-peer: the recipe's epochs (its OneCycle spans them)
    peer_epochs: int = 15  # --vs-peer: the peer's epochs (its OneCycle spans them)
    threads: int = 2  # --vs-peer: torch intra-op threads of each training, the same for both (0: torch's default)
    stop_at_target: bool = True  # --vs-peer: end each run at its first evaluation at or above --target
    synthetic_n: int = 2048  # --vs-peer without --data: synthetic training images (a quarter as many held out)
    seed: int = 0

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.vs_peer and bool(self.data) != bool(self.val):
            raise ConfigError("data and val: --vs-peer scores both recipes on the same held-out split; give "
                              "--data TRAIN --val VAL (packed), or neither for the built-in synthetic sets")
        if not 0.0 < self.target <= 1.0:
            raise ConfigError(f"target: an accuracy in (0, 1], e.g. 0.99; got {self.target}")
        if min(self.epochs, self.peer_epochs, self.batch_size) < 1 or self.workers < 0 or self.threads < 0:
            raise ConfigError("epochs, peer_epochs and batch_size must be >= 1; workers and threads >= 0")


def bench_train(cfg: BenchTrainConfig, *, console: Console | None = None) -> list[dict[str, Any]]:
    """Each model x precision trains ``steps`` steps in its own process (so peak memory is its own);
    with ``vs_peer``, the time-to-accuracy race of :func:`bench_vs_peer` instead."""
    import subprocess
    import sys

    con = console or report.console_for_tables()
    if cfg.vs_peer:
        return bench_vs_peer(cfg, console=con)
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


# ---------------------------------------------------------------------------------------------
# --vs-peer: seconds to a target accuracy, the plain PyTorch peer against the recipe

PEER = "plain PyTorch peer"
RECIPE = "signscale recipe"


def seconds_to(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """The first evaluation at or above ``target`` (its seconds, epoch, val_acc), or None: not reached."""
    return next((p for p in curve if p["val_acc"] >= target), None)


def time_ratio(rows: list[dict[str, Any]]) -> float | None:
    """The recipe's seconds to target over the peer's (below 1: the recipe is faster); None unless both got there."""
    by = {r["recipe"]: r for r in rows}
    ours, peer = by.get(RECIPE, {}).get("seconds_to_target"), by.get(PEER, {}).get("seconds_to_target")
    return ours / peer if ours is not None and peer else None


def race_row(recipe: str, curve: list[dict[str, float]], target: float, **info: Any) -> dict[str, Any]:
    """One recipe's figures from its evaluation curve: reached or not, said as measured."""
    hit = seconds_to(curve, target)
    return {"recipe": recipe, **info, "curve": curve, "evaluations": len(curve),
            "best_val_acc": max((p["val_acc"] for p in curve), default=float("nan")),
            "seconds_to_target": hit["seconds"] if hit else None, "epoch_at_target": hit["epoch"] if hit else None,
            "seconds_run": curve[-1]["seconds"] if curve else 0.0}


def race_summary(rows: list[dict[str, Any]], target: float) -> str:
    """One line: each recipe's seconds to target (or how far it got) and the ratio of the two."""
    parts = []
    for r in rows:
        if r["seconds_to_target"] is not None:
            parts.append(f"{r['recipe']} {r['seconds_to_target']:,.0f} s (epoch {r['epoch_at_target']:g})")
        else:
            parts.append(f"{r['recipe']} not reached in {r['seconds_run']:,.0f} s / {r['evaluations']} epochs "
                         f"(best {r['best_val_acc']:.2%})")
    ratio = time_ratio(rows)
    if ratio is None:
        tail = ": no ratio (both must reach the target)"
    else:
        tail = (f": the recipe takes {ratio:.2f}x the peer's time "
                + (f"({1 / ratio:.1f}x faster)" if ratio <= 1 else f"({ratio:.1f}x slower)"))
    return f"time to {target:.1%} held-out accuracy: " + ", ".join(parts) + tail


def _race_data(cfg: BenchTrainConfig, tmp: str) -> tuple[str, str, float]:
    """(train URL, val URL, seconds spent packing): the given datasets, or two synthetic sets packed here."""
    if cfg.data:
        return cfg.data, cfg.val, 0.0
    import time

    from signscale.data.pack import PackConfig, pack

    t = time.perf_counter()
    urls = []
    sets = (("train", cfg.synthetic_n, cfg.seed + 1), ("val", max(64, cfg.synthetic_n // 4), cfg.seed + 2))
    for name, n, seed in sets:
        urls.append(os.path.join(tmp, name))
        pack(PackConfig(source=f"synthetic:?n={n}&size=32&seed={seed}", out=urls[-1], workers=0, progress=False))
    return urls[0], urls[1], time.perf_counter() - t


def in_memory(url: str, space: Any) -> tuple[Any, Any]:
    """(uint8 NCHW images, int64 labels) of a whole packed dataset, labels in ``space``: the peer's input."""
    import torch

    from signscale.data.stream import ShardStream, StreamConfig, StreamLoader

    stream = ShardStream(StreamConfig(datasets=(url,), batch_size=1024, shuffle=False, remainder="pad"),
                         label_space=space)
    xs, ys = [], []
    for b in StreamLoader(stream, num_workers=0):
        keep = ~b["pad"]
        xs.append(b["image"][keep])
        ys.append(b["label"][keep])
    return torch.cat(xs).permute(0, 3, 1, 2).contiguous(), torch.cat(ys).long()


def bench_vs_peer(cfg: BenchTrainConfig, *, console: Console | None = None) -> list[dict[str, Any]]:
    """The recipe, then the peer, each scored on ``val`` after every epoch; the seconds each took to
    reach ``target`` (its clock: from the call that trains it to the evaluation that first reads the
    target, evaluations included) and their ratio. Returns one row per recipe."""
    import time

    import torch

    from signscale.bench.peer import PeerConfig, train_peer
    from signscale.data.manifest import Manifest
    from signscale.training.train import TrainConfig, train

    con = console or report.console_for_tables()
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tmp = tempfile.mkdtemp(prefix="signscale-bench-peer-")
    try:
        data, val, pack_s = _race_data(cfg, tmp)
        space = Manifest.load(data).label_space
        t = time.perf_counter()
        train_x, train_y = in_memory(data, space)
        val_x, val_y = in_memory(val, space)
        load_s = time.perf_counter() - t
        con.print(f"{len(train_y):,} training and {len(val_y):,} held-out images, {len(space)} classes; "
                  f"{cfg.threads or torch.get_num_threads()} threads and {cfg.workers} loader worker(s) each, {device}")

        def say(who: str) -> Any:
            def show(p: dict[str, float]) -> bool:
                con.print(f"  {who:18s} epoch {p['epoch']:4.1f}  val acc {p['val_acc']:7.2%}  at {p['seconds']:6.0f} s")
                return cfg.stop_at_target and p["val_acc"] >= cfg.target
            return show

        # the recipe first: on a shared machine its (shorter) run is the one least likely to be cut short
        ours = train(TrainConfig(data=(data,), val=val, out=os.path.join(tmp, "recipe"), model=cfg.model,
                                 precision=cfg.precision, channels_last=cfg.channels_last, epochs=cfg.epochs,
                                 batch_size=cfg.batch_size, device=device, workers=cfg.workers, threads=cfg.threads,
                                 seed=cfg.seed, progress=False, calibrate=False),
                     on_validation=say(RECIPE))
        peer_cfg = PeerConfig(epochs=cfg.peer_epochs, workers=cfg.workers, threads=cfg.threads, seed=cfg.seed,
                              device=device)
        peer = train_peer(train_x, train_y, val_x, val_y, peer_cfg, num_classes=len(space),
                          stop_at=cfg.target if cfg.stop_at_target else None, on_eval=say(PEER))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [race_row(PEER, peer.curve, cfg.target, model="5-conv BN CNN", precision="fp32",
                     batch_size=peer_cfg.batch_size, params=peer.params, samples_per_s=peer.samples_per_s,
                     prep=f"{load_s:.1f} s into memory"),
            race_row(RECIPE, ours.curve, cfg.target, model=cfg.model, precision=cfg.precision,
                     batch_size=cfg.batch_size, params=ours.params, samples_per_s=ours.samples_per_s,
                     prep=f"{pack_s:.1f} s pack" if pack_s else "packed before")]
    _print_race(rows, cfg, con, device, val)
    return rows


def _print_race(rows: list[dict[str, Any]], cfg: BenchTrainConfig, con: Console, device: str, val: str) -> None:
    table = Table(title=f"bench train --vs-peer: seconds to {cfg.target:.1%} on {val or 'synthetic'}, device {device}, "
                        f"threads {cfg.threads or 'default'}, loader workers {cfg.workers} (each)")
    for col in ("recipe", "model", "params", "precision", "batch", "samples/s", "best val acc", "epochs run",
                f"s to {cfg.target:.1%}", "at epoch", "vs peer", "data"):
        table.add_column(col, justify="left" if col in ("recipe", "model", "precision", "data") else "right")
    ratio = time_ratio(rows)
    for r in rows:
        reached = r["seconds_to_target"] is not None
        table.add_row(r["recipe"], r["model"], f"{r['params'] / 1e6:.2f}M", r["precision"], str(r["batch_size"]),
                      f"{r['samples_per_s']:,.0f}", f"{r['best_val_acc']:.2%}", str(r["evaluations"]),
                      f"{r['seconds_to_target']:,.0f}" if reached else "not reached",
                      f"{r['epoch_at_target']:g}" if reached else "-",
                      "1.00x" if r["recipe"] == PEER and reached else
                      (f"{ratio:.2f}x" if r["recipe"] == RECIPE and ratio is not None else "-"), r["prep"])
    con.print(table)
    con.print("seconds from the call that starts each training (data already in memory or packed) to the first "
              "per-epoch evaluation at or above the target, evaluations included; samples/s while training",
              style="dim")
    con.print(race_summary(rows, cfg.target))
