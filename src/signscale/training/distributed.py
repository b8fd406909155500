"""Process-group setup from torchrun's environment, and the few collectives the package needs.

This is the one module (with the trainer) that reads torchrun's variables (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, ...). Everything degrades to single-process no-ops when they are absent,
so the same command runs alone or under ``torchrun``.
"""

from __future__ import annotations

import datetime
import functools
import os
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import torch
import torch.distributed as dist

from signscale.data.world import barrier, env_world, is_initialized, is_main, rank, world_size

__all__ = ["all_gather_object", "all_reduce_sum", "barrier", "device", "env_world", "init", "is_initialized",
           "is_main", "launched_by_torchrun", "rank", "restores_threads", "setup", "shutdown", "world_size"]


P = ParamSpec("P")
R = TypeVar("R")


def restores_threads(fn: Callable[P, R]) -> Callable[P, R]:
    """For library entry points that set torch's intra-op threads (a ``threads`` option, or
    :func:`setup`): the caller's process gets its own count back afterwards, whatever happened, so a
    ``threads=1`` run does not make everything after it in the process run differently."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        threads = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def init(backend: str | None = None, timeout_s: float = 1800) -> bool:
    """Join the process group torchrun describes; returns False when running as a single process.

    NCCL when CUDA is available, gloo otherwise. Idempotent.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) < 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env_world()[2])
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def device(name: str = "auto") -> torch.device:
    """The device this process should use: ``auto`` picks this rank's GPU (LOCAL_RANK) or the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", env_world()[2])
    return torch.device(name)


def setup(device_name: str = "auto", threads: int = 0, seed: int = 0) -> tuple[int, int, torch.device]:
    """A training run's first steps: join the process group, pick this rank's device, set torch's
    intra-op threads (0: torch's default) and seed. Returns (rank, world size, device)."""
    init()
    dev = device(device_name)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return rank(), world_size(), dev


def shutdown() -> None:
    """Leave the process group together: a rank that tears gloo down while another is still writing
    the model can abort at exit (SIGABRT, "terminate called without an active exception"), which
    torchrun reports as a failed run although the work was done."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_gather_object(obj: Any) -> list[Any]:
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
