"""Calibrated confidence: one temperature per model, fitted on held-out data, stored with the model.

Temperature scaling (Guo et al., 2017) divides a network's logits by one scalar ``T`` before the
softmax. It never changes which class wins (top-1 and the confusion matrix stay the same), only how
sure the model says it is: label smoothing, which our recipe trains with, leaves a model
*under*-confident (99.6% right at a mean confidence of 0.905), which ``T < 1`` undoes. One
parameter fitted on a few thousand validation images cannot over-fit the way a per-class method can.

Where things happen, so that no two places disagree:

* :func:`fit_temperature` minimises the NLL of labelled logits over ``log T`` (L-BFGS, float64);
* the model folder's ``model.json`` carries the result under ``"calibration"`` (plain JSON, read
  without executing code), written at the end of training (:mod:`signscale.training.train`, on ``--val``)
  or for an existing model by ``signscale calibrate`` (:func:`signscale.evaluation.calibrate.calibrate`);
* :func:`temperature_of` is the one reader of that field and :func:`scale_logits` the one function
  that applies it: the predictor (so ``predict`` and ``serve``, and an ONNX export), the evaluator
  and the continual gate's predictions all go through them.

The weights' sha256 does not cover ``model.json``, so calibrating a model leaves ``model.pt`` and
its checksum as they were; only the metadata file is rewritten (atomically).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from signscale import storage

__all__ = ["CALIBRATION_KEY", "CalibrationError", "TemperatureFit", "TemperatureScaled", "fit_temperature",
           "nll", "save_temperature", "scale_logits", "temperature_of", "with_temperature"]

CALIBRATION_KEY = "calibration"
# Beyond these a "fit" says more about the data than the model (a handful of samples, all right or
# all wrong): clamp, and let the record's NLL figures show what happened.
T_MIN, T_MAX = 0.05, 20.0


class CalibrationError(ValueError):
    """A calibration that cannot be fitted or read; the message names the data or the file and the fix."""


@dataclass(frozen=True)
class TemperatureFit:
    """The fitted temperature and what it did to the NLL of the data it was fitted on."""

    temperature: float
    nll_before: float  # mean NLL at T = 1
    nll_after: float  # mean NLL at the fitted T
    count: int  # samples fitted on
    data: str = ""  # what they were (a dataset URL or source spec), for the record

    def to_dict(self) -> dict[str, Any]:
        return {"method": "temperature", "temperature": self.temperature, "nll_before": self.nll_before,
                "nll_after": self.nll_after, "count": self.count, "data": self.data}

    def summary(self) -> str:
        return (f"temperature {self.temperature:.4f} fitted on {self.count:,} samples of {self.data or 'the data'}: "
                f"NLL {self.nll_before:.4f} -> {self.nll_after:.4f}")


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / T``: the one place a temperature touches a model's output (identity at T = 1)."""
    return logits if temperature == 1.0 else logits / temperature


def nll(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / T)``."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.int64)
    return float(torch.nn.functional.cross_entropy(z / temperature, y))


def fit_temperature(logits: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, *, data: str = ""
                    ) -> TemperatureFit:
    """The temperature that minimises the NLL of ``labels`` given ``logits`` [N, C] (or log-probabilities).

    Log-probabilities work as well as logits: the softmax ignores a per-row shift, and
    ``log_softmax(z) = z - logsumexp(z)`` is one. Optimised over ``log T`` (positive by construction,
    and the NLL is smooth and unimodal in it) with L-BFGS in float64, so the same inputs give the same
    temperature; the result is clamped to [0.05, 20].
    """
    z = torch.as_tensor(logits, dtype=torch.float64).detach().cpu()
    y = torch.as_tensor(labels, dtype=torch.int64).detach().cpu()
    if z.ndim != 2 or y.shape != (z.shape[0],):
        raise CalibrationError(f"expected logits [N, C] and labels [N], got {tuple(z.shape)} and {tuple(y.shape)}")
    if z.shape[0] == 0:
        raise CalibrationError("no labelled sample to fit a temperature on; give a validation set with samples")
    if not torch.isfinite(z).all():
        raise CalibrationError("the logits hold non-finite values; the model is broken, not miscalibrated")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, tolerance_grad=1e-10, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(np.clip(math.exp(float(log_t.detach())), T_MIN, T_MAX))
    before = nll(z, y)
    after = nll(z, y, t)
    if not after <= before:  # a flat or degenerate case where the optimiser wandered: keep the model as it is
        t, after = 1.0, before
    return TemperatureFit(temperature=t, nll_before=before, nll_after=after, count=int(z.shape[0]), data=data)


def temperature_of(meta: dict[str, Any], where: str = "model.json") -> float:
    """The temperature a model's metadata carries (1.0 when it was never calibrated)."""
    record = meta.get(CALIBRATION_KEY)
    if record is None:
        return 1.0
    t = record.get("temperature") if isinstance(record, dict) else None
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not T_MIN <= float(t) <= T_MAX:
        raise CalibrationError(f"{where}: {CALIBRATION_KEY}.temperature must be a number in [{T_MIN}, {T_MAX}], "
                               f"got {t!r}; fit it again with `signscale calibrate MODEL VALIDATION_DATA`")
    return float(t)


def save_temperature(model_url: str, fit: TemperatureFit, extra: dict[str, Any] | None = None) -> str:
    """Record ``fit`` in the model folder's ``model.json`` (atomically; the weights stay untouched)."""
    url = model_url[: -len("/model.pt")] if model_url.endswith("/model.pt") else model_url.rstrip("/")
    meta_url = storage.join(url, "model.json")
    if not storage.exists(meta_url):
        raise CalibrationError(f"{url}: no model.json here; give a model artefact folder (a training run's model/)")
    meta = storage.read_json(meta_url)
    if meta.get("format") != "signscale.model":
        raise CalibrationError(f"{meta_url}: not a signscale model artefact (format {meta.get('format')!r}); "
                               "calibrate the model folder, then export it again")
    meta[CALIBRATION_KEY] = {**fit.to_dict(), **(extra or {})}
    storage.write_json(meta_url, meta)
    return meta_url


class TemperatureScaled(torch.nn.Module):
    """A network whose logits come out divided by its temperature (what the predictor and the gate run)."""

    def __init__(self, model: torch.nn.Module, temperature: float) -> None:
        super().__init__()
        self.model = model
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scale_logits(self.model(x), self.temperature)


def with_temperature(model: torch.nn.Module, meta: dict[str, Any], where: str = "model.json") -> torch.nn.Module:
    """``model`` itself when its metadata has no temperature (so an uncalibrated graph stays as it was),
    else the model wrapped in :class:`TemperatureScaled`."""
    t = temperature_of(meta, where)
    return model if t == 1.0 else TemperatureScaled(model, t)
