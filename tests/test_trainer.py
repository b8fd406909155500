"""The one trainer loop, driven by a small task of its own over a real packed dataset and loader: what
every task gets from it (preemption, exact resume, metrics before checkpoints, the run's last checkpoint)."""

import json
import os
import signal
from typing import Any

import pytest
import torch

from signscale.data.stream import ShardStream, StreamConfig, StreamLoader
from signscale.training import checkpoint
from signscale.training.trainer import LoopConfig, Trainer, TrainError, Validation, resume_url


class _Linear:
    """A linear classifier on 16x16 pixels; ``validates`` runs a validation (a fixed number) per epoch."""

    Error = TrainError

    def __init__(self, model: torch.nn.Module, validates: bool) -> None:
        self.model, self.validates, self.validations = model, validates, 0

    def inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch["image"].float().flatten(1) / 255
        return x + 0.01 * torch.randn_like(x), batch["label"]  # randomness from the loop's seed

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        return torch.nn.functional.cross_entropy(self.model(x), y), {"extra": 1.0}

    def describe(self, batch: dict[str, Any]) -> str:
        return f"ids {batch['id'][:4].tolist()}"

    def after_step(self, step: int) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def validate(self, epoch: int, loader_state: dict[str, Any], step: int, losses: list[float]) -> Validation:
        self.validations += 1
        return Validation({"val_acc": 0.5}, best=self.validations == 1)


def _trainer(data: str, out: str, *, validates: bool = False, **loop: Any) -> tuple[Trainer, _Linear]:
    torch.manual_seed(0)
    stream = ShardStream(StreamConfig(datasets=(data,), batch_size=32, seed=3, remainder="drop"))
    loader = StreamLoader(stream, num_workers=0)
    model = torch.nn.Linear(16 * 16 * 3, 43)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    task = _Linear(model, validates)
    cfg = LoopConfig(out=out, total_steps=loop.pop("total_steps", 12), epochs=loop.pop("epochs", 2),
                     until_steps=True, log_every=1, progress=False, data=(data,), **loop)
    t = Trainer(cfg, task, model=model, net=model, params=list(model.parameters()), opt=opt,
                sched=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), scaler=None, loader=loader,
                device=torch.device("cpu"), rank=0, world=1, run_config={"toy": 1}, manifests=["m"])
    url = resume_url("auto", out)
    if url:
        t.restore(checkpoint.load_checkpoint(url), url)
    return t, task


def test_a_task_without_validation_ends_with_a_checkpoint_that_counts_every_metrics_line(synthetic_dataset, tmp_path):
    t, _ = _trainer(synthetic_dataset, str(tmp_path / "run"))
    r = t.fit()
    assert r.step == 12 and r.epoch == 1 and len(r.losses) == 12  # 300 samples / 32: 9 steps an epoch
    last = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(str(tmp_path / "run")))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert int(last["step"]) == 12 and last["metrics_lines"] == len(lines) == 12
    assert json.loads(lines[-1])["extra"] == 1.0 and last["validations"] == 0


def test_sigterm_stops_at_a_checkpoint_and_the_resumed_run_equals_an_uninterrupted_one(synthetic_dataset, tmp_path):
    ref, _ = _trainer(synthetic_dataset, str(tmp_path / "ref"), validates=True)
    want = ref.fit().losses

    def term_at_5(step: int, loss: float, model: torch.nn.Module) -> None:
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler turns it into a flag

    run = str(tmp_path / "run")
    t, _ = _trainer(synthetic_dataset, run, validates=True)
    first = t.fit(on_step=term_at_5)
    assert first.preempted and first.step == 5 and checkpoint.latest_checkpoint(run).endswith("step-000000005.pt")
    t, task = _trainer(synthetic_dataset, run, validates=True)
    done = t.fit()
    assert done.step == 12 and done.losses == pytest.approx(want, abs=1e-6)
    assert task.validations == 2  # one per epoch, none repeated or lost across the stop
    ref_lines = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    run_lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    strip = ("samples_per_s", "data_wait_frac")
    assert [{k: v for k, v in json.loads(x).items() if k not in strip} for x in run_lines] == \
        [{k: v for k, v in json.loads(x).items() if k not in strip} for x in ref_lines]


def test_a_non_finite_loss_after_a_resume_names_the_checkpoint_it_resumed_from(synthetic_dataset, tmp_path):
    run = str(tmp_path / "run")
    first, _ = _trainer(synthetic_dataset, run, total_steps=4)
    first.fit()
    t, task = _trainer(synthetic_dataset, run, total_steps=8)  # resumes at step 4; the next save is at the end
    task.loss = lambda x, y: (torch.tensor(float("nan")), {})
    with pytest.raises(TrainError, match=r"non-finite loss at step 4 .*last good checkpoint: .*step-000000004\.pt"):
        t.fit()


def test_a_non_finite_loss_names_the_step_the_batch_and_the_last_checkpoint(synthetic_dataset, tmp_path):
    t, task = _trainer(synthetic_dataset, str(tmp_path / "run"), checkpoint_every=2)
    task.loss = lambda x, y: (torch.tensor(float("nan")), {}) if t.result.step == 3 else _Linear.loss(task, x, y)
    with pytest.raises(TrainError, match=r"non-finite loss at step 3 \(epoch 0\) on ids \[.*last good checkpoint: "
                                         r".*step-000000002.pt"):
        t.fit()
