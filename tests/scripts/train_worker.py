"""Run by the training tests in real processes (alone or under torchrun with gloo).

usage: train_worker.py OUT.json ACTION K key=value...
ACTION: none | kill (SIGKILL itself after step K) | term (SIGTERM itself after step K)
        | kill_before_save / kill_after_save (SIGKILL itself just before / after its K-th checkpoint write)
Writes, from rank 0, every rank's per-step losses and parameter checksums.
"""

import json
import os
import signal
import sys

import torch

from signscale import config
from signscale.training import checkpoint, distributed
from signscale.training.train import TrainConfig, train


def main() -> None:
    out, action, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = config.load(TrainConfig, None, sys.argv[4:])
    sums: list[float] = []

    def on_step(step: int, loss: float, model: torch.nn.Module) -> None:
        sums.append(float(sum(p.detach().double().sum() for p in model.parameters())))
        if step == k and action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if step == k and action == "term":
            os.kill(os.getpid(), signal.SIGTERM)

    if action in ("kill_before_save", "kill_after_save"):
        _kill_around_save(k, after=action == "kill_after_save")
    result = train(cfg, on_step=on_step)
    mine = {"rank": distributed.rank(), "losses": result.losses, "param_sums": sums, "steps": result.steps,
            "preempted": result.preempted, "skipped": result.skipped_steps, "model": result.model_url}
    gathered = distributed.all_gather_object(mine)
    if distributed.rank() == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    distributed.shutdown()


def _kill_around_save(k: int, *, after: bool) -> None:
    """SIGKILL this process at an exact point of the crash window around the k-th checkpoint write."""
    real, calls = checkpoint.save_checkpoint, [0]

    def save(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        url = real(*args, **kwargs)
        if calls[0] == k and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return url

    checkpoint.save_checkpoint = save


if __name__ == "__main__":
    main()
