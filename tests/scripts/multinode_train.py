"""Run by tests/test_multinode.py under torchrun agents (one per "node", c10d rendezvous, gloo).

usage: multinode_train.py LOGDIR KILL_RANK KILL_STEP key=value...

Trains with ``signscale.training.train.train`` and appends one JSON line per optimizer step to
``LOGDIR/rank-R.jsonl``: the attempt (0, or 1 after the restart), the step and the ids of the
samples in that step's batch (read from the batch's ``meta`` matrix as the loader yields it). Lines are flushed and
fsynced before the step returns, so a step that completed is on disk even
if the process is SIGKILLed right after.

Once (a marker file in LOGDIR remembers it), rank ``KILL_RANK`` SIGKILLs itself after step
``KILL_STEP`` (-1: never). ``TORCHELASTIC_RESTART_COUNT`` is not used for that: it counts the
restarts of *this node's* agent, and the agent whose worker did not fail restarts its workers
without counting one. At the end each rank writes ``LOGDIR/final-R.json`` with a sha256 of its parameters, so the test
can check every rank holds the same weights.
"""

import hashlib
import json
import os
import signal
import sys

import torch

import signscale.data.stream as stream_mod
from signscale import config
from signscale.training import distributed
from signscale.training.train import TrainConfig, train


def main() -> None:
    logdir, kill_rank, kill_step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cfg = config.load(TrainConfig, None, sys.argv[4:])
    rank = int(os.environ.get("RANK", "0"))
    pending: list[list[int]] = []  # ids (padding excluded) of the batches the loader yielded, in order
    digest = [""]

    original = stream_mod.unpack_batch

    def recording_unpack(b):  # StreamLoader looks unpack_batch up at call time: this sees every yielded batch
        out = original(b)
        pending.append(out["id"][~out["pad"]].tolist())
        return out

    stream_mod.unpack_batch = recording_unpack
    marker = os.path.join(logdir, "killed")
    restart = int(os.path.exists(marker))  # 0: the first attempt, 1: the group torchrun restarted
    log = open(os.path.join(logdir, f"rank-{rank}.jsonl"), "a")  # noqa: SIM115 - open for the whole run

    def on_step(step: int, loss: float, model: torch.nn.Module) -> None:
        ids = pending.pop(0)  # accumulate=1: one yielded batch per optimizer step
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        digest[0] = hashlib.sha256(flat.numpy().tobytes()).hexdigest()
        log.write(json.dumps({"restart": restart, "rank": rank, "step": step, "ids": ids, "loss": loss}) + "\n")
        log.flush()
        os.fsync(log.fileno())
        if rank == kill_rank and step == kill_step and not os.path.exists(marker):
            open(marker, "w").close()  # once: after the restart ranks may sit on other nodes
            os.kill(os.getpid(), signal.SIGKILL)

    result = train(cfg, on_step=on_step)
    with open(os.path.join(logdir, f"final-{rank}.json"), "w") as f:
        json.dump({"rank": rank, "restart": restart, "steps": result.steps, "epochs": result.epochs,
                   "world_size": result.world_size, "weights_sha256": digest[0], "losses": result.losses}, f)
    distributed.shutdown()


if __name__ == "__main__":
    main()
