"""``export(ExportConfig) -> ExportResult``: a model artefact as ONNX, checked against PyTorch before it is kept.

The exported graph is :class:`signscale.serving.predict.ProbabilityModel`: resized uint8 images
``[B, S, S, 3]`` in (``images``), class probabilities ``[B, C]`` out (``probs``), with the
normalisation inside, so an edge device needs only a decoder, a resize and onnxruntime. The
batch dimension is dynamic.

The export folder holds ``model.onnx`` and then ``model.json`` (label space, preprocessing, the
source model's URL and sha256, the sha256 of ``model.onnx`` and the measured parity), written
last so a folder with a ``model.json`` is always complete. The parity check runs onnxruntime and
PyTorch on the same inputs (clean rendered signs and random pixels) and refuses to write anything
when the largest difference in probabilities exceeds the tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from signscale import config, storage
from signscale.serving.predict import load_torch
from signscale.serving.runtime import OPSET, OnnxRunner, onnx_bytes

__all__ = ["ExportConfig", "ExportError", "ExportResult", "export", "onnx_bytes", "parity_inputs"]



class ExportError(ValueError):
    """An export that cannot be written as asked; the message names the model and what to do."""


@dataclass(frozen=True)
class ExportConfig:
    model: str  # model artefact folder (model.json + model.pt), any storage URL
    out: str = ""  # export folder; empty: MODEL-onnx beside the model folder
    format: Literal["onnx"] = "onnx"
    opset: int = OPSET
    # torchscript: torch.onnx's tracing exporter, well under a second for these CNNs;
    # dynamo: the torch.export-based one (needs onnxscript), several seconds, the future default.
    exporter: Literal["torchscript", "dynamo"] = "torchscript"
    samples: int = 64  # parity inputs
    tolerance: float = 1e-4  # largest allowed |p_onnx - p_torch| over all inputs and classes
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.model:
            raise config.ConfigError("model: give the model artefact folder to export")
        if self.format != "onnx":
            raise config.ConfigError(f"format: only onnx is supported, got {self.format!r}")
        if self.exporter not in ("torchscript", "dynamo"):
            raise config.ConfigError(f"exporter: expected torchscript or dynamo, got {self.exporter!r}")
        if not 13 <= self.opset <= 23:
            raise config.ConfigError(f"opset: expected 13..23, got {self.opset}")
        if self.samples < 1:
            raise config.ConfigError(f"samples: must be >= 1, got {self.samples}")
        if not self.tolerance > 0:
            raise config.ConfigError(f"tolerance: must be > 0, got {self.tolerance}")

    def out_url(self) -> str:
        return self.out or self.model.rstrip("/") + "-onnx"


@dataclass(frozen=True)
class ExportResult:
    out: str
    files: tuple[str, ...]
    max_abs_diff: float
    samples: int
    sha256: str
    bytes: int

    def summary(self) -> str:
        return (f"exported {self.out}/model.onnx ({self.bytes / 1e6:.2f} MB); parity on {self.samples} inputs: "
                f"max |p_onnx - p_torch| = {self.max_abs_diff:.2e}")


def parity_inputs(size: int, n: int, seed: int = 0) -> np.ndarray:
    """[n, size, size, 3] uint8: clean rendered signs (confident outputs) and random pixels (flat ones)."""
    from signscale.data.sources.pictograms import render_clean

    rng = np.random.default_rng(seed)
    clean = [render_clean(i % 43, size) for i in range(n // 2)]
    noise = list(rng.integers(0, 256, size=(n - len(clean), size, size, 3), dtype=np.uint8))
    return np.stack(clean + noise)


def _max_diff(module: torch.nn.Module, data: bytes, inputs: np.ndarray) -> float:
    runner = OnnxRunner(data, threads=0)
    with torch.inference_mode():
        expected = module(torch.from_numpy(inputs)).numpy()
    got = np.concatenate([runner(inputs[i:i + 16]) for i in range(0, len(inputs), 16)])  # odd batch sizes too
    return float(np.abs(got - expected).max())


def export(cfg: ExportConfig) -> ExportResult:
    """Write ``cfg.out_url()/model.onnx`` and ``model.json`` once parity with PyTorch holds."""
    module, meta = load_torch(cfg.model, torch.device("cpu"))
    data = onnx_bytes(module, opset=cfg.opset, exporter=cfg.exporter)
    diff = _max_diff(module, data, parity_inputs(module.pre.image_size, cfg.samples, cfg.seed))
    if not diff <= cfg.tolerance:
        raise ExportError(f"{cfg.model}: ONNX output differs from PyTorch by {diff:.3g} (> tolerance "
                          f"{cfg.tolerance:g}); nothing written. Try --exporter dynamo or another --opset")
    out = cfg.out_url().rstrip("/")
    sha = storage.write_bytes(storage.join(out, "model.onnx"), data)
    desc: dict[str, Any] = {
        "format": "signscale.onnx",
        "format_version": 1,
        "sha256": sha,
        "bytes": len(data),
        "input": {
            "name": "images",
            "dtype": "uint8",
            "shape": ["batch", module.pre.image_size, module.pre.image_size, 3],
            "layout": "NHWC RGB, already resized (PIL bilinear, antialiased) to size x size",
        },
        "output": {"name": "probs", "dtype": "float32", "shape": ["batch", meta["model_config"]["num_classes"]]},
        "opset": cfg.opset,
        "exporter": cfg.exporter,
        "parity": {"max_abs_diff": diff, "samples": cfg.samples, "tolerance": cfg.tolerance},
        "source": {"url": cfg.model, "sha256": meta.get("sha256")},
        # calibration is a record only: the temperature is already inside the exported graph
        **{
            k: meta[k]
            for k in ("model_config", "label_space", "preprocess", "metrics", "data_crop", "calibration")
            if k in meta
        },
    }
    storage.write_json(storage.join(out, "model.json"), desc)  # last: its presence means the folder is whole
    return ExportResult(out=out, files=(storage.join(out, "model.onnx"), storage.join(out, "model.json")),
                        max_abs_diff=diff, samples=cfg.samples, sha256=sha, bytes=len(data))
