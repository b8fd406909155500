"""Mixed precision: autocast for the forward pass and the one function that owns the optimizer step.

Keeping scale -> backward -> unscale -> clip -> step -> update in one place is the lesson of
timm's NativeScaler and of the torchvision reference that once stepped twice per batch under AMP
because these branches were spread through the loop.

* ``fp32``: no autocast, no scaler.
* ``bf16``: autocast to bfloat16; same exponent range as fp32, so no loss scaling is needed.
* ``fp16``: autocast to float16 with a GradScaler; a step whose gradients overflow is skipped and
  the scale lowered, which :func:`optimizer_step` reports.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable

import torch

from signscale.config import Precision

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(name: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward-pass context for ``name`` on ``device``."""
    if name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[name])


def make_scaler(name: Precision, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16, None otherwise."""
    if name != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """Backward of one micro-batch (scaled under fp16)."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


@dataclass(frozen=True)
class StepResult:
    skipped: bool  # fp16 found inf/nan gradients: no parameter changed
    grad_norm: float


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   params: Iterable[torch.nn.Parameter], *, clip_norm: float = 0.0) -> StepResult:
    """Unscale, clip, step and update once per optimizer step, then zero the gradients."""
    params = [p for p in params if p.grad is not None]
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_norm > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip_norm))
    else:
        norm = float(torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in params]))) \
            if params else 0.0
    if scaler is not None:
        before = scaler.get_scale()
        scaler.step(optimizer)  # skips the step itself when it found inf/nan
        scaler.update()
        skipped = scaler.get_scale() < before
    else:
        skipped = not math.isfinite(norm)
        if not skipped:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(skipped=skipped, grad_norm=norm)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: CUDA allocator peak, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
