"""Checkpoint integrity and training's crash windows (issue 19, items 2 and 3).

A crash is reproduced at an exact point, never by timing: in-process by making the k-th checkpoint
write stop the run just before or just after it writes (what a kill -9 there leaves on disk), and, in
the slow tests, by a real SIGKILL at the same point in a training subprocess. Each crashed run is
resumed with ``--resume=auto`` and compared with an uninterrupted run: the same metrics lines (timing
fields aside), curve, weights, ``best.pt`` and model metadata.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from signscale.training import checkpoint
from signscale.training.train import TrainConfig, train

TIMING = {"samples_per_s", "data_wait_frac", "seconds"}
# The synthetic set in batches of 64: 5 steps an epoch, 10 in all. Checkpoint writes, in order:
# steps 1-5 (the 5th just after epoch 1's last step), epoch 1's validation at step 5 (write 6),
# steps 6-10 (writes 7-11), the final validation at step 10 (write 12).
STEPS_PER_EPOCH = 5
LAST_STEP_WRITE = 2 * STEPS_PER_EPOCH + 1


def _config(data: str, out: Path, **kw) -> TrainConfig:
    base = {"data": (data,), "val": data, "out": str(out), "model": "small_cnn", "batch_size": 64, "epochs": 2,
            "workers": 0, "checkpoint_every": 1, "keep_last": 3, "log_every": 1, "progress": False, "threads": 1,
            "lr": 0.01, "ema": 0.9}
    return TrainConfig(**{**base, **kw})


def _flip(path: Path, offset: int | None = None) -> None:
    """Flip one bit of one byte (by default in the middle of the file, inside the tensor data)."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x10
    path.write_bytes(bytes(data))


def outcome(run: Path) -> dict:
    """Everything a finished run leaves that must not depend on whether it was interrupted."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((run / "result.json").read_text())
    weights, meta = checkpoint.load_model_artefact(str(run / "model"))
    best = checkpoint.load_checkpoint(str(run / "checkpoints" / "best.pt"))
    return {"metrics": [{k: v for k, v in x.items() if k not in TIMING} for x in lines],
            "curve": [{k: v for k, v in c.items() if k not in TIMING} for c in result["curve"]],
            "model_metrics": meta["metrics"], "weights": {k: v.tolist() for k, v in weights.items()},
            "best": (int(best["step"]), float(best["best"]), json.loads(best["curve"])[-1]["val_acc"])}


def assert_consistent(o: dict) -> None:
    """model.json, best.pt and metrics.jsonl all tell the curve's story."""
    vals = [c["val_acc"] for c in o["curve"]]
    assert [x["val_acc"] for x in o["metrics"] if "val_acc" in x] == vals
    assert o["model_metrics"]["val_acc"] == vals[-1] and o["model_metrics"]["best_val_acc"] == max(vals)
    first_best = next(c for c in o["curve"] if c["val_acc"] == max(vals))
    assert o["best"] == (first_best["step"], max(vals), max(vals))
    steps = [x["step"] for x in o["metrics"] if "loss" in x]
    assert steps == list(range(1, len(steps) + 1))  # every step once, in order


@pytest.fixture(scope="module")
def reference(synthetic_dataset, tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("ref") / "run"
    train(_config(synthetic_dataset, run))
    o = outcome(run)
    assert len(o["curve"]) == 2 and o["curve"][0]["step"] == STEPS_PER_EPOCH
    assert_consistent(o)
    return o


class _Killed(BaseException):
    """Stands for kill -9: nothing of the run's own clean-up runs after it (not an Exception)."""


def _crash_at(monkeypatch, k: int, *, after: bool) -> None:
    """Stop the run at its k-th checkpoint write, just before or just after it."""
    real, calls = checkpoint.save_checkpoint, itertools.count(1)

    def save(*args, **kwargs):
        i = next(calls)
        if i == k and not after:
            raise _Killed
        url = real(*args, **kwargs)
        if i == k and after:
            raise _Killed
        return url

    monkeypatch.setattr(checkpoint, "save_checkpoint", save)


@pytest.mark.parametrize("k,after", [
    (1, True),  # the first step's checkpoint written, its metrics line not yet (on the old code)
    (STEPS_PER_EPOCH, True),  # just after epoch 1's last step: its validation still owed
    (STEPS_PER_EPOCH + 1, False),  # epoch 1 validated and logged, its checkpoint not yet written
    (LAST_STEP_WRITE, True),  # just after the last step: the final validation, best.pt, model.json owed
    (LAST_STEP_WRITE + 1, True),  # everything checkpointed, model.json and result.json not yet written
])
def test_a_run_stopped_around_a_checkpoint_resumes_to_the_uninterrupted_outcome(
        synthetic_dataset, tmp_path, monkeypatch, reference, k, after):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _crash_at(m, k, after=after)
        with pytest.raises(_Killed):
            train(_config(synthetic_dataset, run))
    assert not (run / "model").exists()
    res = train(_config(synthetic_dataset, run, resume="auto"))
    o = outcome(run)
    assert o == reference
    assert_consistent(o)
    assert res.final_val_acc == reference["curve"][-1]["val_acc"]


def test_pending_validation_is_recorded_in_the_checkpoint(synthetic_dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _crash_at(m, STEPS_PER_EPOCH, after=True)
        with pytest.raises(_Killed):
            train(_config(synthetic_dataset, run))
    st = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(str(run)))
    assert json.loads(st["val_pending"]) == {"epoch": 0} and json.loads(st["curve"]) == []
    assert st["metrics_lines"] == STEPS_PER_EPOCH
    assert len((run / "metrics.jsonl").read_text().splitlines()) == STEPS_PER_EPOCH  # durable before it


# ---------------------------------------------------------------------------------------------
# Integrity: the sha256 in latest.json is checked on load


@pytest.fixture
def finished(synthetic_dataset, tmp_path) -> tuple[TrainConfig, Path, dict]:
    """A finished 3-step run (checkpoint every step, validated at the end) and its outcome."""
    cfg = _config(synthetic_dataset, tmp_path / "run", max_steps=3)
    train(cfg)
    return cfg, tmp_path / "run" / "checkpoints", outcome(tmp_path / "run")


def test_flipped_byte_in_latest_checkpoint_falls_back_to_the_newest_intact_one(finished):
    cfg, ck, before = finished
    _flip(ck / "step-000000003.pt")
    with pytest.warns(UserWarning,  # checkpoint.CheckpointWarning
                      match=r"step-000000003\.pt is corrupt: sha256 .*step-000000002\.pt instead"):
        res = train(dataclasses.replace(cfg, resume="auto"))
    assert res.steps == 3
    assert outcome(Path(cfg.out)) == before  # step 3 trained again from step 2: the same run
    assert checkpoint.load_checkpoint(str(ck / "step-000000003.pt"))["step"] == 3  # rewritten intact


def test_explicit_resume_from_a_corrupt_checkpoint_names_it(finished):
    cfg, ck, _ = finished
    _flip(ck / "step-000000003.pt")
    url = str(ck / "step-000000003.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"step-000000003\.pt: corrupt.*--resume=auto"):
        train(dataclasses.replace(cfg, resume=url))
    st = checkpoint.load_checkpoint(str(ck / "step-000000002.pt"))  # its neighbours are still verified
    assert st["step"] == 2


def test_no_intact_checkpoint_left_names_every_file_and_the_fix(finished):
    cfg, ck, _ = finished
    kept = sorted(p.name for p in ck.glob("step-*.pt"))
    assert kept == ["step-000000001.pt", "step-000000002.pt", "step-000000003.pt"]
    _flip(ck / kept[0])
    _flip(ck / kept[1])
    (ck / kept[2]).unlink()
    with pytest.raises(checkpoint.CheckpointError) as info:
        train(dataclasses.replace(cfg, resume="auto"))
    msg = str(info.value)
    assert f"{kept[2]} is missing" in msg and f"{kept[1]} is corrupt" in msg and f"{kept[0]} is corrupt" in msg
    assert "start a new run" in msg


def test_best_pt_is_verified_on_load(finished):
    _, ck, before = finished
    assert checkpoint.load_checkpoint(str(ck / "best.pt"))["step"] == before["best"][0]
    intact = (ck / "best.pt").read_bytes()
    _flip(ck / "best.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"best\.pt: corrupt"):
        checkpoint.load_checkpoint(str(ck / "best.pt"))
    (ck / "best.pt").write_bytes(intact)
    index = json.loads((ck / "latest.json").read_text())
    assert index["best"]["path"] == "best.pt" and index["best"]["step"] == before["best"][0]


def test_a_damaged_best_pt_is_written_back_from_the_kept_checkpoint_of_its_step(finished, tmp_path, capsys):
    cfg, ck, before = finished
    intact = (ck / "best.pt").read_bytes()
    _flip(ck / "best.pt")
    train(dataclasses.replace(cfg, resume="auto"))  # a run starting in its folder checks best.pt first
    assert (ck / "best.pt").read_bytes() == intact and "best.pt was damaged or missing" in capsys.readouterr().err
    run = tmp_path / "copy"
    shutil.copytree(ck.parent, run)
    best = run / "checkpoints" / "best.pt"
    intact = best.read_bytes()
    step = checkpoint.load_checkpoint(str(best))["step"]
    kept = {e["step"] for e in json.loads((run / "checkpoints" / "latest.json").read_text())["checkpoints"]}
    assert step in kept  # the fixture keeps the best step's checkpoint
    _flip(best)
    assert "written back from step-" in checkpoint.repair_best(str(run)) and best.read_bytes() == intact
    assert checkpoint.repair_best(str(run)) == ""  # intact now: nothing to do
    best.unlink()
    assert "written back" in checkpoint.repair_best(str(run)) and best.read_bytes() == intact
    for e in kept:  # none of its bytes left anywhere: a warning names the file, nothing else changes
        (run / "checkpoints" / f"step-{e:09d}.pt").unlink()
    _flip(best)
    assert checkpoint.repair_best(str(run)).startswith(f"warning: {best}")


def test_unreadable_index_is_named_with_the_fix(finished):
    cfg, ck, _ = finished
    (ck / "latest.json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match=r"latest\.json: unreadable.*--resume=URL"):
        train(dataclasses.replace(cfg, resume="auto"))
    with pytest.warns(checkpoint.CheckpointWarning, match="loaded unverified"):
        assert checkpoint.load_checkpoint(str(ck / "step-000000003.pt"))["step"] == 3
    with pytest.warns(checkpoint.CheckpointWarning, match="loaded unverified"):  # the user's explicit choice
        assert train(dataclasses.replace(cfg, resume=str(ck / "step-000000002.pt"))).steps == 3
    index = json.loads((ck / "latest.json").read_text())  # a new index, naming only what it can vouch for
    assert [e["step"] for e in index["checkpoints"]] == [3] and "best" in index
    assert (ck / "step-000000001.pt").exists()  # files it cannot vouch for are not deleted early


def test_resume_from_an_older_checkpoint_drops_the_abandoned_later_ones(finished):
    cfg, ck, before = finished
    res = train(dataclasses.replace(cfg, resume=str(ck / "step-000000001.pt"), keep_last=2))
    assert res.steps == 3 and outcome(Path(cfg.out)) == before  # metrics cut back to step 1, then redone
    index = json.loads((ck / "latest.json").read_text())
    assert [e["step"] for e in index["checkpoints"]] == [2, 3]
    assert sorted(p.name for p in ck.glob("step-*.pt")) == ["step-000000002.pt", "step-000000003.pt"]


# ---------------------------------------------------------------------------------------------
# Real processes, real SIGKILL at the same points

SCRIPT = str(Path(__file__).parent / "scripts" / "train_worker.py")
ARGS = ["model=small_cnn", "batch_size=64", "epochs=2", "workers=2", "checkpoint_every=1", "log_every=1",
        "progress=false", "threads=1", "lr=0.01", "ema=0.9", "augment.enabled=true"]


def _worker(out_json: Path, action: str, k: int, *overrides: str) -> int:
    proc = subprocess.run([sys.executable, SCRIPT, str(out_json), action, str(k), *ARGS, *overrides],
                          check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode in (0, -9), proc.stderr[-3000:]
    return proc.returncode


@pytest.fixture(scope="module")
def uninterrupted_process(synthetic_dataset, tmp_path_factory) -> tuple[dict, list[float]]:
    """The outcome and per-step losses of the uninterrupted run in a process of its own."""
    base = tmp_path_factory.mktemp("sigkill-ref")
    data = [f"data={synthetic_dataset}", f"val={synthetic_dataset}"]
    assert _worker(base / "ref.json", "none", 0, *data, f"out={base / 'ref'}") == 0
    return outcome(base / "ref"), json.loads((base / "ref.json").read_text())[0]["losses"]


@pytest.mark.slow
@pytest.mark.parametrize("k,after", [(1, True), (STEPS_PER_EPOCH, True), (STEPS_PER_EPOCH + 1, False),
                                     (LAST_STEP_WRITE, True)])
def test_sigkill_around_a_checkpoint_then_resume_matches_an_uninterrupted_run(synthetic_dataset, tmp_path, k,
                                                                              after, uninterrupted_process):
    ref, ref_losses = uninterrupted_process
    data = [f"data={synthetic_dataset}", f"val={synthetic_dataset}"]
    run = tmp_path / "run"
    action = "kill_after_save" if after else "kill_before_save"
    assert _worker(tmp_path / "x.json", action, k, *data, f"out={run}") == -9
    assert not (run / "model").exists()
    assert _worker(tmp_path / "res.json", "none", 0, *data, f"out={run}", "resume=auto") == 0
    res = outcome(run)
    assert res == ref
    assert_consistent(res)
    assert json.loads((tmp_path / "res.json").read_text())[0]["losses"] == ref_losses  # bit-exact
