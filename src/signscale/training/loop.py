"""The pieces every training loop shares (the classifier's and the detector's): which checkpoint to
resume from, what a checkpoint holds and how a run is put back from it, and stopping together.

A checkpoint holds the model, optimizer, scheduler, loss scaler, the loader's exact position, every
RNG and the loss curve, plus what identifies the run (config, the datasets' checksums, world size);
each loop adds its own keys (the classifier: EMA, best accuracy, the validation it owes).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from signscale import config as config_mod
from signscale import storage
from signscale.training import checkpoint, distributed


def resume_url(resume: str, out: str) -> str:
    """The checkpoint to resume from: ``auto`` the newest good one in ``out`` ('' when there is none),
    a URL as given, '' for a fresh run."""
    if resume == "auto":
        return checkpoint.latest_checkpoint(out) or ""
    return resume


def remove_killed_writes(out: str) -> list[str]:
    """Remove the temp files writes killed with the last run left in its folder (rank 0 only).

    A run folder has one writer, rank 0 of the run training into it, so at the start nothing there is
    in progress and every temp is stale. Without this a ``.metrics.jsonl.tmp-*`` from a kill lay there forever.
    """
    return storage.remove_temps(out, recursive=True)


def run_state(*, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, scaler: Any,
              loader_state: dict[str, Any], losses: list[float], cfg: Any, manifests: list[str],
              world: int) -> dict[str, Any]:
    """The keys every loop's checkpoint carries."""
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {}, "loader": json.dumps(loader_state),
            "rng": checkpoint.rng_state(), "losses": torch.tensor(losses, dtype=torch.float64),
            "config": config_mod.to_dict(cfg), "manifests": manifests, "world_size": world}


def restore(state: dict[str, Any], *, model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
            scaler: Any, loader: Any) -> tuple[int, list[float]]:
    """Put a run back as :func:`run_state` saved it; returns (step, losses)."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    loader.load_state_dict(json.loads(state["loader"]))
    checkpoint.set_rng_state(state["rng"])
    return int(state["step"]), [float(x) for x in state["losses"]]


def loader_state(loader: Any, world: int) -> dict[str, Any]:
    """The loader's position across all ranks (every rank's consumed batches), for a checkpoint."""
    return loader.state_dict(distributed.all_gather_object(loader.local_state()), world)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank says so: a signal or a time limit may reach one rank only, and
    all ranks must stop at the same step."""
    if not distributed.is_initialized():
        return flag
    return bool(distributed.all_reduce_sum(torch.tensor([int(flag)], device=device)).item())
