"""``signscale calibrate MODEL DATA``: fit a model's temperature on held-out data (never its training
data) and record it in its model.json, where predict, serve and evaluate read it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from signscale import calibration
from signscale.config import Precision
from signscale.evaluation.evaluate import (
    DEFAULT_DATA,
    EvalConfig,
    EvalError,
    label_map,
    load_model,
    log_probs,
    open_data,
    pct,
)
from signscale.evaluation.metrics import (
    expected_calibration_error,
    reliability_sums,
)
from signscale.training import distributed


@dataclass(frozen=True)
class CalibrateConfig:
    """Which model to calibrate, on which held-out data (read as ``evaluate`` reads it)."""

    model: str  # model artefact folder; its model.json gains the fitted temperature
    data: str = DEFAULT_DATA  # held-out data: the validation split (never the training data), dataset or source
    batch_size: int = 512
    workers: int = 2
    device: str = "auto"
    precision: Precision = "fp32"
    crop: Literal["auto", "none", "roi"] = "auto"
    threads: int = 0
    progress: bool = True
    write: bool = True  # False: fit and print, leave model.json as it is

    def __post_init__(self) -> None:
        # the shared fields are checked exactly as evaluate checks them
        self.eval_config()

    def eval_config(self) -> EvalConfig:
        return EvalConfig(model=self.model, data=self.data, batch_size=self.batch_size, workers=self.workers,
                          device=self.device, precision=self.precision, crop=self.crop, threads=self.threads,
                          progress=self.progress)


@dataclass(frozen=True)
class CalibrationResult:
    fit: calibration.TemperatureFit
    ece_before: float
    ece_after: float
    top1: float
    written: str  # the model.json that now holds the temperature ("" with write=False)

    def summary(self) -> str:
        where = f"; written to {self.written}" if self.written else "; not written (write=false)"
        return (f"{self.fit.summary()}, ECE {self.ece_before:.4f} -> {self.ece_after:.4f} (top-1 "
                f"{pct(self.top1)}, unchanged){where}")


@distributed.restores_threads
def calibrate(cfg: CalibrateConfig) -> CalibrationResult:
    """Fit ``cfg.model``'s temperature on ``cfg.data`` and record it in its ``model.json``.

    One process; the data is read, cropped and resized exactly as :func:`evaluate` reads it. The
    fit starts from the plain network (T = 1) whatever temperature the model had, so calibrating
    again on other data replaces the old value rather than stacking on it.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ecfg = cfg.eval_config()
    device = distributed.device(cfg.device)
    model, space, pre, info = load_model(cfg.model, device)
    if cfg.data.rstrip("/") in [str(d).rstrip("/") for d in info.get("datasets", [])]:
        raise EvalError(f"{cfg.data}: the model was trained on this data; a temperature fitted on it would make the "
                        "model over-confident. Give the held-out validation split (train's --val)")
    if ecfg.crop == "auto":
        ecfg = dataclasses.replace(ecfg, crop=info.get("data_crop", "none"))
    data = open_data(ecfg, pre, 0, 1, pin=device.type == "cuda")
    lut = torch.from_numpy(label_map(data.label_space, space)[0])
    logps, labels = [], []
    from signscale.progress import progress_bar

    with progress_bar("calibrate", data.batches, enabled=cfg.progress, unit="batches") as advance:
        for b in data.loader([]):
            mapped = lut[b["label"].long()]
            keep = ~b["pad"] & (mapped >= 0)
            if keep.any():
                logps.append(log_probs(model, b["image"][keep], pre, device, cfg.precision)[1].cpu())
                labels.append(mapped[keep])
            advance(1)
    if not logps:
        raise EvalError(f"{cfg.data}: no sample of a class the model knows; nothing to calibrate on")
    z, y = torch.cat(logps).double(), torch.cat(labels)
    try:
        fit = calibration.fit_temperature(z, y, data=cfg.data)
    except calibration.CalibrationError as exc:
        raise EvalError(f"{cfg.data}: {exc}") from None

    def ece(t: float) -> float:
        p = calibration.scale_logits(z, t).softmax(1)
        conf, pred = p.max(1)
        return expected_calibration_error(reliability_sums(conf.numpy(), (pred == y).numpy()))

    before, after = ece(1.0), ece(fit.temperature)
    top1 = float((z.argmax(1) == y).double().mean())
    written = ""
    if cfg.write:
        written = calibration.save_temperature(cfg.model, fit, {"ece_before": before, "ece_after": after})
    return CalibrationResult(fit=fit, ece_before=before, ece_after=after, top1=top1, written=written)
