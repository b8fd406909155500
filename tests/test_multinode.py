"""Multi-node training on one host: two torchrun agents meeting over a c10d rendezvous (gloo, CPU).

Each agent is its own ``torchrun --nnodes 2 --nproc-per-node 1`` process, as on two machines; they
find each other through the rendezvous endpoint only (127.0.0.1 and a port that was free a moment
ago). The elastic test SIGKILLs one worker mid-epoch, after a checkpoint: torchrun
(``--max-restarts 1``) restarts the whole group, training resumes from the last checkpoint
(``resume=auto``), and the per-step sample-id logs prove the epoch saw every sample exactly once.
"""

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from signscale.data import shards
from signscale.data.manifest import Manifest
from signscale.training import checkpoint

SCRIPT = str(Path(__file__).parent / "scripts" / "multinode_train.py")
# 300 samples, 2 ranks x batch 16, drop: 150 per rank, 10 steps per epoch (the last batch holds 6)
BASE = ["model=small_cnn", "batch_size=16", "workers=0", "ema=0", "lr=0.01", "progress=false", "threads=1",
        "log_every=1", "epochs=1"]


def free_port() -> int:
    """A port the kernel just handed out (bind port 0, read it back, release it for the agents)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agents(logdir: Path, overrides: list[str], *, kill_rank: int = -1, kill_step: int = -1,
           max_restarts: int = 0) -> list[subprocess.CompletedProcess]:
    """Start two torchrun agents (node ranks 0 and 1) and wait for both."""
    port = free_port()
    # A restarted group must not read the previous attempt's gloo addresses from the store the agents
    # share by default (torch 2.14 no longer prefixes worker keys per attempt): with this set, each
    # rendezvous round's rank 0 hosts a fresh store on a new port.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test-{port}",
               "--node-rank", str(node), "--max-restarts", str(max_restarts), "--monitor-interval", "0.5",
               SCRIPT, str(logdir), str(kill_rank), str(kill_step), *BASE, *overrides]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=240)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def steps_by_rank(logdir: Path) -> dict[int, list[dict]]:
    out = {}
    for r in (0, 1):
        out[r] = [json.loads(line) for line in (logdir / f"rank-{r}.jsonl").read_text().splitlines()]
    return out


def all_ids(url: str) -> list[int]:
    m = Manifest.load(url)
    return sorted(int(i) for k in range(len(m.shards)) for i in shards.ShardReader(m.shard_url(k)).records()["id"])


@pytest.mark.slow
def test_two_agents_c10d_rendezvous_train_to_the_same_weights(synthetic_dataset, tmp_path):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    res = agents(logdir, [f"data={synthetic_dataset}", f"out={tmp_path / 'run'}"])
    for r in res:
        assert r.returncode == 0, r.stderr[-3000:]
    finals = [json.loads((logdir / f"final-{r}.json").read_text()) for r in (0, 1)]
    assert [f["world_size"] for f in finals] == [2, 2]
    assert finals[0]["steps"] == finals[1]["steps"] == 10
    assert finals[0]["weights_sha256"] and finals[0]["weights_sha256"] == finals[1]["weights_sha256"]
    assert finals[0]["losses"] == finals[1]["losses"]  # the global loss, all-reduced
    logs = steps_by_rank(logdir)
    ids = [i for r in (0, 1) for line in logs[r] for i in line["ids"]]
    assert sorted(ids) == all_ids(synthetic_dataset)  # 300 samples, each once across the two nodes
    assert {i for line in logs[0] for i in line["ids"]}.isdisjoint(i for line in logs[1] for i in line["ids"])
    assert checkpoint.latest_checkpoint(str(tmp_path / "run")) is not None


@pytest.mark.slow
def test_elastic_restart_after_sigkill_resumes_with_every_sample_exactly_once(synthetic_dataset, tmp_path):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    run = tmp_path / "run"
    res = agents(logdir, [f"data={synthetic_dataset}", f"out={run}", "checkpoint_every=3", "resume=auto"],
                 kill_rank=1, kill_step=5, max_restarts=1)
    for r in res:
        assert r.returncode == 0, r.stderr[-3000:]
    logs = steps_by_rank(logdir)
    for r in (0, 1):
        attempts = Counter(line["restart"] for line in logs[r])
        assert set(attempts) == {0, 1}, f"rank {r} ran attempts {dict(attempts)}: expected a first run and a restart"
        first = [line["step"] for line in logs[r] if line["restart"] == 0]
        second = [line["step"] for line in logs[r] if line["restart"] == 1]
        assert max(first) >= 5  # it got past the checkpoint at step 3 before the kill
        assert second == list(range(4, 11))  # resumed after the step-3 checkpoint, to the end of the epoch
    # The epoch as the model saw it: steps 1-3 from the first attempt (kept by the checkpoint),
    # steps 4-10 from the restart; steps 4-5 of the first attempt were rolled back with the process.
    kept = {(r, line["step"]): line["ids"] for r in (0, 1) for line in logs[r]
            if (line["restart"] == 0 and line["step"] <= 3) or line["restart"] == 1}
    ids = [i for v in kept.values() for i in v]
    assert len(ids) == len(set(ids)) == 300  # nothing repeated ...
    assert sorted(ids) == all_ids(synthetic_dataset)  # ... and nothing lost
    # and the replayed steps read exactly the samples the killed attempt had read at those steps
    for r in (0, 1):
        lost = {line["step"]: line["ids"] for line in logs[r] if line["restart"] == 0 and line["step"] > 3}
        again = {line["step"]: line["ids"] for line in logs[r] if line["restart"] == 1}
        assert all(again[s] == ids_ for s, ids_ in lost.items())
    finals = [json.loads((logdir / f"final-{r}.json").read_text()) for r in (0, 1)]
    assert all(f["restart"] == 1 and f["steps"] == 10 for f in finals)
    assert finals[0]["weights_sha256"] == finals[1]["weights_sha256"]
