"""Run by the training tests in real processes (alone or under torchrun with gloo).

usage: train_worker.py OUT.json ACTION K key=value...
ACTION: none | kill (SIGKILL itself after step K) | term (SIGTERM itself after step K)
Writes, from rank 0, every rank's per-step losses and parameter checksums.
"""

import json
import os
import signal
import sys

import torch

from signscale import config, distributed
from signscale.train import TrainConfig, train


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

    result = train(cfg, on_step=on_step)
    mine = {"rank": distributed.rank(), "losses": result.losses, "param_sums": sums, "steps": result.steps,
            "preempted": result.preempted, "skipped": result.skipped_steps, "model": result.model_url}
    gathered = distributed.all_gather_object(mine)
    if distributed.rank() == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    distributed.shutdown()


if __name__ == "__main__":
    main()
