"""The back-ends a :class:`signscale.serving.predict.Predictor` runs a model on: PyTorch, or ONNX Runtime
over the graph :func:`onnx_bytes` writes (the same graph ``signscale export`` saves, so a model served
with ``backend=onnx`` answers as its export does). Export and the predictor both build on this module.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["OPSET", "BackendError", "OnnxRunner", "TorchRunner", "onnx_bytes", "onnxruntime"]

OPSET = 18


class BackendError(ValueError):
    """A back-end that cannot run here (a missing optional package); the message says what to install."""


def onnx_bytes(module: torch.nn.Module, *, opset: int = OPSET, exporter: str = "torchscript") -> bytes:
    """Serialise a :class:`ProbabilityModel` to ONNX with a dynamic batch dimension."""
    try:
        import onnx  # noqa: F401  (both exporters need it)
    except ImportError:
        raise BackendError("ONNX export needs the onnx package: pip install 'signscale[onnx]'") from None
    size = module.pre.image_size  # type: ignore[union-attr]
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    buf = io.BytesIO()
    module = module.eval()
    with warnings.catch_warnings():  # the tracing exporter announces its deprecation on every call
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=65536)
            prog = torch.onnx.export(module, (example,), input_names=["images"], output_names=["probs"],
                                     dynamo=True, opset_version=opset, dynamic_shapes=({0: batch},),
                                     verbose=False)
            prog.save(buf)  # type: ignore[union-attr]
        else:
            torch.onnx.export(module, (example,), buf, input_names=["images"], output_names=["probs"],
                              dynamo=False, opset_version=opset,
                              dynamic_axes={"images": {0: "batch"}, "probs": {0: "batch"}})
    return buf.getvalue()



class TorchRunner:
    """Runs a :class:`ProbabilityModel` with PyTorch on one device."""

    name = "torch"

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.module = module.to(device).eval()
        self.device = device

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            return self.module(x).cpu().numpy()


class OnnxRunner:
    """Runs an ONNX graph of a :class:`ProbabilityModel` with onnxruntime (CPU)."""

    name = "onnx"

    def __init__(self, onnx_bytes: bytes, threads: int) -> None:
        ort = onnxruntime()
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: np.ascontiguousarray(batch)})[0]


def onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise BackendError("the onnx back-end needs onnxruntime: pip install 'signscale[onnx]'") from None
    return onnxruntime
