"""``signscale demo``: the whole system on built-in synthetic data, in minutes on 2 CPU cores.

Each stage is a library call a user could make: render a synthetic set, pack it into shards,
stream it back through the exactly-once loader, train the small model on it and validate on
signs it has never seen (another seed), writing pictures along the way.

``say`` (the CLI passes a printer) gets a heading as each leg starts and its result as it ends, so
a user sees the classifier's accuracy minutes before the detection leg finishes. An existing output
folder is never overwritten: the demo writes to the next free name (``signscale-demo2``, as
Ultralytics numbers ``exp2``), unless ``exist_ok`` is set.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from signscale import storage
from signscale.data.pack import PackConfig, pack
from signscale.data.show import dataset_info, dataset_sample, show


@dataclass(frozen=True)
class DemoConfig:
    out: str = "signscale-demo"  # output folder; if it exists, the next free one (signscale-demo2, ...)
    exist_ok: bool = False  # write into an existing output folder instead of picking the next free name
    samples: int = 8000  # synthetic training signs
    val_samples: int = 1000  # synthetic validation signs (another seed: never seen in training)
    image_size: int = 32  # image side in pixels
    seed: int = 0
    epochs: int = 10
    model: str = "small_cnn"
    detection: bool = True  # the road-scene leg: a detector on synthetic scenes, classified by the model above
    detection_steps: int = 240  # detector training steps


@dataclass
class DemoResult:
    out: str
    samples: int = 0
    shards: int = 0
    seconds: float = 0.0
    val_acc: float = float("nan")
    train_summary: str = ""
    eval_summary: str = ""
    detection_summary: str = ""
    files: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        files = "\n  ".join(f"{k}: {v}" for k, v in self.files.items())
        return (
            f"demo: packed {self.samples:,} synthetic signs into {self.shards} shard(s), trained {self.train_summary}"
            f"\n  validation accuracy on unseen synthetic signs: {self.val_acc:.1%}  (total {self.seconds:.0f}s)"
            f"\n  {self.eval_summary}"
            + (f"\n  road scenes: {self.detection_summary}" if self.detection_summary else "")
            + f"\n  {files}"
            + (
                f"\nnext: signscale serve {self.files['model']}   (a page to try it at http://127.0.0.1:8000/; "
                "needs the 'serve' extra)"
                if "model" in self.files
                else ""
            )
        )


def _detection_extra() -> bool:
    """Whether the scene evaluation's mAP back-end (torchmetrics + pycocotools) is installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torchmetrics", "pycocotools"))


def free_folder(out: str) -> str:
    """``out`` if nothing is there yet, else the first of ``out2``, ``out3``, ... that is free."""
    out = out.rstrip("/")
    if not storage.exists(out):
        return out
    n = 2
    while storage.exists(f"{out}{n}"):
        n += 1
    return f"{out}{n}"


def _quiet(text: str) -> None:
    """The default ``say``: library callers get the result object, not prints."""


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = _quiet) -> DemoResult:
    started = time.perf_counter()
    out = cfg.out.rstrip("/") if cfg.exist_ok else free_folder(cfg.out)
    if out != cfg.out.rstrip("/"):
        say(f"{cfg.out} exists: writing to {out} (--exist-ok writes into {cfg.out})")
    cfg = replace(cfg, out=out)
    storage.makedirs(out)
    legs = 3 if cfg.detection else 2
    say(f"\n== 1/{legs} data: {cfg.samples:,} synthetic signs -> shards in {out}/data")
    spec = f"synthetic:?n={cfg.samples}&size={cfg.image_size}&seed={cfg.seed}"
    result = DemoResult(out=out)
    src = show(spec, out=storage.join(out, "synthetic_sheet.png"))
    result.files["contact sheet"] = src.sheet
    data = storage.join(out, "data", "synthetic")
    packed = pack(
        PackConfig(source=spec, out=data, image_size=cfg.image_size, shard_mb=4, workers=min(2, os.cpu_count() or 1))
    )
    result.samples, result.shards = packed.count, packed.shards
    say(packed.summary())
    info = dataset_info(data, histogram=storage.join(out, "class_histogram.png"))
    result.files["class histogram"] = info.histogram
    result.files["loader sample"] = dataset_sample(data, n=32, out=storage.join(out, "loader_sample.png"))
    val = storage.join(out, "data", "synthetic-val")
    pack(PackConfig(source=f"synthetic:?n={cfg.val_samples}&size={cfg.image_size}&seed={cfg.seed + 1000}", out=val,
                    image_size=cfg.image_size, shard_mb=4, workers=min(2, os.cpu_count() or 1)))
    from signscale.training.train import TrainConfig, train

    say(f"\n== 2/{legs} classifier: {cfg.model} for {cfg.epochs} epoch(s), then the evaluation report")
    run = storage.join(out, "run")
    trained = train(TrainConfig(data=(data,), val=val, out=run, model=cfg.model, epochs=cfg.epochs, batch_size=128,
                                lr=5e-3, seed=cfg.seed, workers=1))
    result.val_acc = trained.final_val_acc
    result.train_summary = (f"{cfg.model} for {trained.epochs} epochs in {trained.seconds:.0f}s "
                            f"({trained.samples_per_s:,.0f} samples/s)")
    result.files["model"] = trained.model_url
    result.files["training metrics"] = storage.join(run, "metrics.jsonl")
    from signscale.evaluation.evaluate import EvalConfig, evaluate

    report_dir = storage.join(out, "report")
    report = evaluate(EvalConfig(model=trained.model_url, data=val, out=report_dir, workers=1,
                                 corruptions=("snow", "fog", "night", "blur"), severities=(3,)))
    result.eval_summary = report.summary()
    result.files["evaluation report"] = storage.join(report_dir, "report.html")
    say(f"classifier: validation accuracy {result.val_acc:.1%} on unseen synthetic signs; {result.eval_summary}")
    if cfg.detection and not _detection_extra():
        result.detection_summary = "skipped: the detection leg needs pip install 'signscale[detection]'"
        say(f"\n== 3/{legs} road scenes: {result.detection_summary}")
    elif cfg.detection:
        from signscale.demos.detection import demo_detection

        say(f"\n== 3/{legs} road scenes: synthetic scenes, a detector for {cfg.detection_steps} steps, its report")
        det = demo_detection(storage.join(out, "detection"), classifier=trained.model_url, steps=cfg.detection_steps,
                             seed=cfg.seed)
        result.detection_summary = det["summary"]
        result.files.update(det["files"])
        say(f"road scenes: {det['summary']}")
    result.seconds = time.perf_counter() - started
    return result
