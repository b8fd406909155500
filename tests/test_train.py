import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from signscale.config import ConfigError
from signscale.training import checkpoint, precision
from signscale.training.train import TrainConfig, TrainError, train

# modules these tests exercise through the ones they import (tests/test_layout.py)
COVERS = ("signscale.progress",)

SCRIPT = str(Path(__file__).parent / "scripts" / "train_worker.py")
BASE = ["model=small_cnn", "batch_size=16", "workers=2", "ema=0.99", "lr=0.01", "progress=false",
        "augment.enabled=true", "threads=1", "log_every=1"]


def _run(out_json, nproc, action, k, *overrides, expect_rc=0):
    args = [SCRIPT, str(out_json), action, str(k), *BASE, *overrides]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
           if nproc > 1 else [sys.executable, *args])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == expect_rc, proc.stderr[-3000:]
    return json.loads(Path(out_json).read_text()) if expect_rc == 0 else None


@pytest.mark.slow
def test_two_processes_match_one_process_with_accumulation(synthetic_dataset, tmp_path):
    common = [f"data={synthetic_dataset}", "max_steps=5", "world_invariant=true"]
    two = _run(tmp_path / "two.json", 2, "none", 0, *common, f"out={tmp_path / 'two'}")
    one = _run(tmp_path / "one.json", 1, "none", 0, *common, "accumulate=2", f"out={tmp_path / 'one'}")
    r0, r1 = two
    assert r0["param_sums"] == r1["param_sums"]  # DDP keeps the ranks identical after every step
    assert len(r0["losses"]) == 5
    assert r0["losses"] == pytest.approx(one[0]["losses"], rel=1e-5, abs=1e-6)
    assert r0["param_sums"] == pytest.approx(one[0]["param_sums"], rel=1e-5)


@pytest.mark.slow
def test_killed_run_resumes_exactly(synthetic_dataset, tmp_path):
    common = [f"data={synthetic_dataset}", "max_steps=9", "checkpoint_every=3", "epochs=3"]
    ref = _run(tmp_path / "ref.json", 1, "none", 0, *common, f"out={tmp_path / 'ref'}")[0]
    run = tmp_path / "run"
    _run(tmp_path / "x.json", 1, "kill", 5, *common, f"out={run}", expect_rc=-9)
    assert checkpoint.latest_checkpoint(str(run)).endswith("step-000000003.pt")
    resumed = _run(tmp_path / "res.json", 1, "none", 0, *common, f"out={run}", "resume=auto")[0]
    assert resumed["steps"] == 9
    assert resumed["losses"] == pytest.approx(ref["losses"], abs=1e-6)


def test_resume_removes_the_temp_files_killed_writes_left(synthetic_dataset, tmp_path):
    out = tmp_path / "run"
    common = dict(data=(synthetic_dataset,), out=str(out), model="small_cnn", batch_size=32, workers=0,
                  checkpoint_every=1, max_steps=3, progress=False)
    train(TrainConfig(**common))
    left = [out / ".metrics.jsonl.tmp-0badf00d", out / "checkpoints" / ".step-000000003.pt.tmp-12345678"]
    for p in left:
        p.write_bytes(b"half a write")
    kept = out / ".metrics.jsonl.tmp-notatemp"  # not a name atomic_write gives: never touched
    kept.write_bytes(b"mine")
    res = train(TrainConfig(**common, resume="auto"))
    assert res.steps == 3
    assert not any(p.exists() for p in left) and kept.read_bytes() == b"mine"


def test_max_steps_beyond_the_epochs_ends_at_the_epochs_with_the_schedule_run_out(synthetic_dataset, tmp_path,
                                                                                  capsys):
    out = tmp_path / "run"
    res = train(TrainConfig(data=(synthetic_dataset,), out=str(out), model="small_cnn", batch_size=32, workers=0,
                            epochs=1, max_steps=50, log_every=1, lr=0.01, progress=False))
    assert res.epochs == 1 and res.steps < 15  # 300 samples in batches of 32: epochs=1 caps the run
    lrs = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines() if "lr" in x]
    assert len(lrs) == res.steps and lrs[-1] < 0.01 / 10  # OneCycle annealed to its end, not left near its peak
    assert f"max_steps 50 is more than 1 epoch(s) of {res.steps} steps" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(synthetic_dataset, tmp_path):
    run = tmp_path / "run"
    res = _run(tmp_path / "t.json", 1, "term", 2, f"data={synthetic_dataset}", "max_steps=50", f"out={run}")[0]
    assert res["preempted"] and res["steps"] == 2
    assert checkpoint.latest_checkpoint(str(run)).endswith("step-000000002.pt")


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_mixed_precision_paths_run(synthetic_dataset, tmp_path, name):
    cfg = TrainConfig(data=(synthetic_dataset,), val=synthetic_dataset, out=str(tmp_path / name), model="small_cnn",
                      batch_size=32, max_steps=3, workers=0, precision=name, progress=False)
    res = train(cfg)
    assert res.steps == 3 and all(math.isfinite(x) for x in res.losses)
    assert 0.0 <= res.final_val_acc <= 1.0
    assert res.peak_memory_mb > 0


def test_fp16_step_is_skipped_on_inf_gradients():
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = precision.make_scaler("fp16", torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(torch.full((3, 4), float("inf"))).sum()
    precision.backward(loss, scaler)
    res = precision.optimizer_step(opt, scaler, model.parameters(), clip_norm=1.0)
    assert res.skipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    loss = model(torch.ones(3, 4)).sum()
    precision.backward(loss, scaler)
    assert not precision.optimizer_step(opt, scaler, model.parameters()).skipped


def test_same_seed_same_model_whatever_ran_before(synthetic_dataset, tmp_path):
    """The initial weights come from TrainConfig.seed, not from the process's random state so far."""
    def run(name: str, seed: int = 0) -> dict:
        res = train(TrainConfig(data=(synthetic_dataset,), out=str(tmp_path / name), model="small_cnn", batch_size=32,
                                max_steps=2, workers=0, progress=False, ema=0.0, seed=seed))
        return checkpoint.load_model_artefact(res.model_url)[0]

    before = torch.get_num_threads()
    a = run("a")
    torch.rand(1000)  # what an earlier caller might have drawn
    b, c = run("b"), run("c", seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    res = train(TrainConfig(data=(synthetic_dataset,), out=str(tmp_path / "t"), model="small_cnn", max_steps=1,
                            workers=0, progress=False, threads=before + 1))
    assert res.steps == 1 and torch.get_num_threads() == before  # the run's threads, not the caller's after it


def test_model_artefact_and_bad_inputs(synthetic_dataset, tmp_path):
    with pytest.raises(ValueError, match="small_cnn"):
        train(TrainConfig(data=(synthetic_dataset,), out=str(tmp_path / "x"), model="smal_cnn", max_steps=1,
                          workers=0, progress=False))
    with pytest.raises(ConfigError, match="data"):
        train(TrainConfig(out=str(tmp_path / "y")))
    cfg = TrainConfig(data=(synthetic_dataset,), out=str(tmp_path / "ok"), model="small_cnn", batch_size=32,
                      max_steps=2, workers=0, progress=False)
    res = train(cfg)
    assert 0 < res.data_wait_s < res.loop_s and "waiting for data" in res.summary()  # the loader's share of the loop
    state, meta = checkpoint.load_model_artefact(res.model_url)
    assert meta["label_space"]["name"] == "de" and meta["preprocess"]["image_size"] == 16
    assert meta["model_config"]["name"] == "small_cnn"
    # a corrupt checkpoint, the only one: clear error naming it, nothing overwritten
    latest = checkpoint.latest_checkpoint(str(tmp_path / "ok"))
    Path(latest).write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError, match=f"no intact checkpoint.*{Path(latest).name} is corrupt"):
        train(TrainConfig(**{**cfg.__dict__, "resume": "auto"}))
    assert Path(latest).read_bytes() == b"garbage"
    (Path(latest).parent / "latest.json").unlink()  # unverifiable: still refused, as unreadable
    with pytest.warns(checkpoint.CheckpointWarning, match="unverified"), \
            pytest.raises(checkpoint.CheckpointError, match="not a readable"):
        train(TrainConfig(**{**cfg.__dict__, "resume": latest}))


def test_class_balanced_loss_weights(synthetic_dataset, tmp_path):
    from signscale.data.manifest import Manifest
    from signscale.training.train import _class_weights

    cfg = TrainConfig(data=(synthetic_dataset,), out=str(tmp_path / "cb"), model="small_cnn", batch_size=32,
                      max_steps=2, workers=0, progress=False, class_balance="loss")
    w = _class_weights(cfg.class_balance, [Manifest.load(synthetic_dataset)], [None], 43, torch.device("cpu")).double()
    hist = torch.from_numpy(Manifest.load(synthetic_dataset).class_histogram()).double()
    assert float((w * hist).sum() / hist.sum()) == pytest.approx(1.0)  # the average sample keeps weight 1
    present = hist > 0
    rare = int(torch.where(present, hist, torch.inf).argmin())
    common = int(hist.argmax())
    assert hist[rare] < hist[common] and w[rare] > w[common]
    assert float(w[rare] * hist[rare]) == pytest.approx(float(w[common] * hist[common]))  # classes weigh equally
    assert train(cfg).steps == 2


def test_non_finite_loss_stops_naming_step_data_and_checkpoint(synthetic_dataset, tmp_path):
    cfg = TrainConfig(data=(synthetic_dataset,), out=str(tmp_path / "nan"), model="small_cnn", batch_size=32,
                      max_steps=6, checkpoint_every=2, workers=0, progress=False, ema=0)

    def poison(step, loss, model):
        if step == 3:
            with torch.no_grad():
                model.head.weight.fill_(float("nan"))

    with pytest.raises(TrainError) as info:
        train(cfg, on_step=poison)
    msg = str(info.value)
    assert "non-finite loss at step 3" in msg and synthetic_dataset in msg and "step-000000002.pt" in msg


def test_swa_ends_with_the_mean_of_the_weights_after_each_step_of_its_share(synthetic_dataset, tmp_path):
    seen = []
    cfg = TrainConfig(data=(synthetic_dataset,), out=str(tmp_path / "swa"), model="small_cnn", batch_size=32,
                      max_steps=6, workers=0, progress=False, calibrate=False, swa_from=0.5)
    res = train(cfg, on_step=lambda step, loss, model: seen.append(
        {k: v.detach().clone() for k, v in model.state_dict().items()}))
    saved = checkpoint.load_model_artefact(res.model_url)[0]
    for name, value in saved.items():
        if value.is_floating_point():  # weights and BatchNorm statistics alike: steps 4, 5 and 6
            assert torch.allclose(value, torch.stack([s[name] for s in seen[3:]]).mean(0), atol=1e-6), name
    assert not torch.allclose(saved["head.weight"], seen[-1]["head.weight"])
    with pytest.raises(ConfigError, match="swa_from"):
        TrainConfig(data=("x",), swa_from=1.0)
