"""The one trainer loop, for every task (classification, detection).

A task says what a batch means: the inputs and targets it makes (augmentation, crops), the loss of
the model on them, what its checkpoints add, and whether and how it validates. The loop does the rest
the same way for every task, so each of these exists once:

* steps and gradient accumulation, with DDP's ``no_sync`` until the last micro-batch;
* autocast and the one optimizer step of :mod:`signscale.training.precision` (bf16, fp16 with loss
  scaling), gradient clipping, the scheduler;
* exact resume: every micro-batch seeds torch from (seed, global micro-batch), the loader resumes at
  the sample it stopped at, and the checkpoint holds model, optimizer, scheduler, scaler, loader
  state, RNGs, losses and whatever the task adds;
* no crash window: metrics lines reach disk before the checkpoint that counts them (a resumed run
  cuts the file back to that count), and a checkpoint taken after an epoch's last step but before
  its validation says so, and resume runs that validation first;
* stopping together: SIGTERM/SIGINT (preemption) and a time limit end every rank at the same step,
  with a checkpoint.

The shape is timm's and Lightning's: the task holds what is model-specific, the loop what is not.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from signscale import config as config_mod
from signscale import storage
from signscale.config import Precision
from signscale.progress import progress_bar
from signscale.training import checkpoint, distributed, precision


class TrainError(RuntimeError):
    """Training cannot go on; the message names the step, the data and the last good checkpoint."""


@dataclass(frozen=True)
class Validation:
    """What a task's validation reports to the loop: the metrics line, and what the checkpoint after it is."""

    record: dict[str, Any]  # logged to metrics.jsonl with step and epoch
    best: bool = False  # the checkpoint after it is also the run's best.pt
    stop: bool = False  # end the run here, as a finished run ends


class Task(Protocol):
    """What the loop needs from a kind of model. ``Error`` is raised for the task's bad batches."""

    Error: type[Exception]
    validates: bool  # whether epochs end in a validation (owed across a kill, run first on resume)

    def inputs(self, batch: dict[str, Any]) -> tuple[Any, Any]:
        """(model input, targets) of a loader batch, on the device; random draws use torch's seeded RNG."""

    def loss(self, x: Any, y: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The micro-batch's loss (run under the loop's autocast) and extra numbers for the metrics line."""

    def describe(self, batch: dict[str, Any]) -> str:
        """Where a batch came from, for an error message (sample ids, dataset)."""

    def after_step(self, step: int) -> None:
        """Called after each optimizer step, ``step`` counting it (an EMA update, say)."""

    def state(self) -> dict[str, Any]:
        """The task's keys in every checkpoint (plain data and tensors)."""

    def validate(self, epoch: int, loader_state: dict[str, Any], step: int, losses: list[float]) -> Validation:
        """The validation that ends an epoch (only called when ``validates``)."""


@dataclass(frozen=True)
class LoopConfig:
    """How long to train and how often to write; the rest of a run's config belongs to its task."""

    out: str  # run folder: checkpoints, metrics.jsonl
    total_steps: int
    epochs: int
    until_steps: bool = False  # stop at total_steps even mid-epoch (max_steps given)
    accumulate: int = 1
    clip_norm: float = 0.0
    precision: Precision = "fp32"
    checkpoint_every: int = 0  # steps between checkpoints (besides epoch ends and the run's end)
    keep_last: int = 3
    log_every: int = 20
    max_seconds: float = 0.0  # stop with a checkpoint after this much wall time (0: no limit)
    seed: int = 0
    progress: bool = True
    name: str = "train"  # the progress bar's and log lines' name
    echo: bool = False  # without a progress bar on screen, print a line per metrics record
    data: tuple[str, ...] = ()  # the training data, for error messages


@dataclass
class LoopResult:
    step: int = 0
    epoch: int = 0
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    samples: int = 0  # over all ranks
    data_wait_s: float = 0.0  # rank 0's time blocked on the loader (the accelerator idles meanwhile)
    seconds: float = 0.0  # the loop's wall time, validation included
    preempted: bool = False
    timed_out: bool = False
    last_checkpoint: str = ""

    @property
    def samples_per_s(self) -> float:
        return self.samples / max(1e-9, self.seconds)


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


def loader_state(loader: Any, world: int) -> dict[str, Any]:
    """The loader's position across all ranks (every rank's consumed batches), for a checkpoint."""
    return loader.state_dict(distributed.all_gather_object(loader.local_state()), world)


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when any rank says so: a signal or a time limit may reach one rank only, and
    all ranks must stop at the same step."""
    if not distributed.is_initialized():
        return flag
    return bool(distributed.all_reduce_sum(torch.tensor([int(flag)], device=device)).item())


def step_seed(seed: int, micro: int) -> int:
    """The seed of global micro-batch ``micro``: N ranks and 1 rank x accumulate N draw the same numbers."""
    return (seed * 1_000_003 + micro * 7919) % (2**63 - 1)


class Trainer:
    """One run's loop over a task: build it, :meth:`restore` a checkpoint if resuming, then :meth:`fit`."""

    def __init__(self, cfg: LoopConfig, task: Task, *, model: torch.nn.Module, net: torch.nn.Module,
                 params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, sched: Any, scaler: Any, loader: Any,
                 device: torch.device, rank: int, world: int, run_config: Any, manifests: list[str]) -> None:
        self.cfg, self.task = cfg, task
        self.model, self.net, self.params, self.opt, self.sched, self.scaler = model, net, params, opt, sched, scaler
        self.loader, self.device, self.rank, self.world = loader, device, rank, world
        self.run_config, self.manifests = run_config, manifests
        self.main = rank == 0
        self.result = LoopResult()
        self.logger = MetricsLog(cfg.out, self.main)
        self.owed: dict[str, Any] | None = None  # an epoch whose validation the resumed checkpoint did not cover
        self._saved_at = -1
        if self.main:
            storage.makedirs(cfg.out)
            remove_killed_writes(cfg.out)
            repaired = checkpoint.repair_best(cfg.out)
            if repaired:
                print(repaired, file=sys.stderr)

    # -- checkpoints

    def restore(self, state: dict[str, Any], url: str) -> None:
        """Put the run back as checkpoint ``url`` (:meth:`save`'s) left it (the task restores its own keys)."""
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.loader.load_state_dict(json.loads(state["loader"]))
        checkpoint.set_rng_state(state["rng"])
        self.result.step = int(state["step"])
        self.result.losses = [float(x) for x in state["losses"]]
        if state.get("val_pending"):
            self.owed = {**json.loads(state["val_pending"]), "loader": json.loads(state["loader"])}
        self.logger.restore(int(state["metrics_lines"]) if "metrics_lines" in state else None)
        self._saved_at = self.result.step
        self.result.last_checkpoint = url  # the last good one until the next save

    def save(self, ls: dict[str, Any], *, best: bool = False, owed_epoch: int | None = None) -> str:
        """Checkpoint at this step with loader state ``ls``; the metrics lines it covers are flushed first."""
        r = self.result
        st = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
              "scheduler": self.sched.state_dict(),
              "scaler": self.scaler.state_dict() if self.scaler is not None else {}, "loader": json.dumps(ls),
              "rng": checkpoint.rng_state(), "losses": torch.tensor(r.losses, dtype=torch.float64),
              "config": config_mod.to_dict(self.run_config), "manifests": self.manifests, "world_size": self.world,
              # a kill after this save finds the epoch's validation still owed, and the file's first lines
              "val_pending": json.dumps({"epoch": owed_epoch}) if owed_epoch is not None else "",
              "metrics_lines": len(self.logger.lines), **self.task.state()}
        self.logger.flush()
        url = checkpoint.save_checkpoint(self.cfg.out, r.step, st, keep_last=self.cfg.keep_last, best=best) \
            if self.main else ""
        distributed.barrier()
        self._saved_at = r.step
        r.last_checkpoint = url or r.last_checkpoint
        return url

    def _save_in_epoch(self, epoch: int) -> None:
        """A checkpoint between steps; after an epoch's (or the run's) last step it owes that validation."""
        ls = loader_state(self.loader, self.world)
        owed = self.task.validates and (ls["epoch"] > epoch or (self.cfg.until_steps and
                                                                self.result.step >= self.cfg.total_steps))
        self.save(ls, owed_epoch=epoch if owed else None)

    def _validate_and_save(self, epoch: int, ls: dict[str, Any]) -> bool:
        """The validation that ends an epoch (or the run), its metrics line and checkpoint; True: stop."""
        v = self.task.validate(epoch, ls, self.result.step, self.result.losses)
        self.logger.log({"step": self.result.step, "epoch": epoch, **v.record})
        self.save(ls, best=v.best)
        return v.stop

    # -- the loop

    def fit(self, on_step: Callable[[int, float, torch.nn.Module], None] | None = None) -> LoopResult:
        """Train until the steps or epochs are done, a validation asks to stop, a signal or the time limit."""
        cfg, r, loader = self.cfg, self.result, self.loader
        t0 = time.perf_counter()
        precision.reset_peak_memory(self.device)
        stop = False
        with _Preemption() as preempt, progress_bar(cfg.name, cfg.total_steps - r.step, enabled=cfg.progress and
                                                    self.main, unit="steps") as advance:
            if self.owed is not None:  # the run stopped between an epoch's last step and its validation
                stop = self._validate_and_save(int(self.owed["epoch"]), self.owed["loader"])
            # An epochs-driven run can reach its last step with micro-batches of the epoch still to go
            # (accumulation); they run, as they would have without the stop, before the final validation.
            done = self._steps_done() or loader.stream.epoch >= cfg.epochs or stop
            while not done:
                epoch = loader.stream.epoch
                micro, halt = self._epoch(epoch, preempt, advance, on_step, t0)
                if halt:  # preempted or out of time: _epoch saved a checkpoint
                    break
                finished_epoch = loader.stream.epoch > epoch
                done = r.step >= cfg.total_steps or loader.stream.epoch >= cfg.epochs
                if (finished_epoch or done) and self.task.validates:
                    done = self._validate_and_save(epoch, loader_state(loader, self.world)) or done
                if micro == 0:
                    raise TrainError(f"the training data yields no batch: {list(cfg.data)} holds fewer samples "
                                     f"than {self.world} process(es) x one batch")
        if not r.preempted and self._saved_at != r.step and not self.task.validates:
            self.save(loader_state(loader, self.world))  # the run's end (a validating task saved after it)
        self.logger.flush()
        r.epoch = loader.stream.epoch
        r.seconds = time.perf_counter() - t0
        return r

    def _steps_done(self) -> bool:
        return bool(self.cfg.until_steps and self.result.step >= self.cfg.total_steps)

    def _epoch(self, epoch: int, preempt: "_Preemption", advance: Callable[[int], None],
               on_step: Callable[[int, float, torch.nn.Module], None] | None, t0: float) -> tuple[int, bool]:
        """One pass over the loader's epoch; returns (micro-batches run, whether the run must end now)."""
        cfg, r, world = self.cfg, self.result, self.world
        self.net.train()
        self.opt.zero_grad(set_to_none=True)  # an epoch's unfinished accumulation does not leak into the next
        micro = 0
        step_loss = torch.zeros((), device=self.device)
        for batch in _timed(self.loader, r):
            micro += 1
            last_micro = micro % cfg.accumulate == 0
            global_micro = (r.step * cfg.accumulate + (micro - 1) % cfg.accumulate) * world + self.rank
            torch.manual_seed(step_seed(cfg.seed, global_micro))  # augmentation, dropout, anything random
            x, y = self.task.inputs(batch)
            sync = nullcontext() if (last_micro or world == 1) else self.net.no_sync()  # type: ignore[operator]
            with sync:
                with precision.autocast(cfg.precision, self.device):  # type: ignore[arg-type]
                    loss, extra = self.task.loss(x, y)
                if not torch.isfinite(loss):
                    raise self.task.Error(
                        f"non-finite loss at step {r.step} (epoch {epoch}) on {self.task.describe(batch)}; last "
                        f"good checkpoint: {r.last_checkpoint or 'none'}. Lower lr or use bf16/fp32.")
                precision.backward(loss / cfg.accumulate, self.scaler)
            step_loss += loss.detach() / cfg.accumulate
            r.samples += len(y) * world
            if not last_micro:
                continue
            res = precision.optimizer_step(self.opt, self.scaler, self.params, clip_norm=cfg.clip_norm)
            r.skipped_steps += int(res.skipped)
            self.task.after_step(r.step + 1)
            self.sched.step()
            r.step += 1
            global_loss = float(distributed.all_reduce_sum(step_loss)) / world
            step_loss = torch.zeros((), device=self.device)
            r.losses.append(global_loss)
            if on_step is not None:
                on_step(r.step, global_loss, self.model)
            advance(1)
            if r.step % cfg.log_every == 0:
                self._log(epoch, global_loss, res, extra, time.perf_counter() - t0)
            if any_rank(preempt.requested, self.device):
                self._save_in_epoch(epoch)
                r.preempted = True
                return micro, True
            over = cfg.max_seconds > 0 and any_rank(time.perf_counter() - t0 > cfg.max_seconds, self.device)
            if cfg.checkpoint_every and r.step % cfg.checkpoint_every == 0 or over:
                self._save_in_epoch(epoch)
            if over and r.step < cfg.total_steps:
                r.timed_out = True
                return micro, True
            if self._steps_done():
                return micro, False
        return micro, False

    def _log(self, epoch: int, loss: float, res: Any, extra: dict[str, float], seconds: float) -> None:
        r = self.result
        rec = {"step": r.step, "epoch": epoch, "loss": loss, "lr": self.sched.get_last_lr()[0],
               "grad_norm": res.grad_norm, "skipped": res.skipped, "samples_per_s": r.samples / seconds,
               "data_wait_frac": r.data_wait_s / seconds, **extra}
        self.logger.log(rec)
        if self.cfg.echo and self.main and not (self.cfg.progress and sys.stderr.isatty()):
            print(f"{self.cfg.name} step {r.step}/{self.cfg.total_steps}: loss {loss:.3f}, "
                  f"{rec['samples_per_s']:.1f} samples/s", flush=True)


# ---------------------------------------------------------------------------------------------
# Pieces


class MetricsLog:
    """Rank 0's metrics JSONL (and TensorBoard events when tensorboard is installed)."""

    def __init__(self, out: str, enabled: bool) -> None:
        self.enabled = enabled
        self.lines: list[str] = []
        self.url = storage.join(out, "metrics.jsonl")
        self.tb = None
        if enabled and storage.is_local(out):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(storage.join(out, "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.lines.append(json.dumps(record))
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch") and math.isfinite(v):
                    self.tb.add_scalar(k, v, record.get("step", 0))

    def restore(self, count: int | None) -> None:
        """Resume the file as it stood at a checkpoint: its first ``count`` lines (all for older checkpoints).

        Lines are flushed before each checkpoint, so the file holds at least ``count``; any after them
        were logged past the checkpoint by the run that stopped, and the resumed run logs them again.
        """
        if not self.enabled:
            return
        lines = storage.read_text(self.url).splitlines() if storage.exists(self.url) else []
        if count is not None and len(lines) < count:
            print(f"warning: {self.url} holds {len(lines)} lines, fewer than the {count} the checkpoint "
                  "covers (written by an older signscale, or edited); the missing ones are not rebuilt",
                  file=sys.stderr)
        self.lines = lines if count is None else lines[:count]

    def flush(self) -> None:
        if self.enabled and self.lines:
            storage.write_bytes(self.url, ("\n".join(self.lines) + "\n").encode())
            if self.tb is not None:
                self.tb.flush()


class _Preemption:
    """Turns SIGTERM/SIGINT into a flag checked between steps, so a checkpoint is written first."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Preemption":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _timed(loader: Iterable[dict[str, Any]], result: LoopResult) -> Iterator[dict[str, Any]]:
    """The loader's batches, adding the time spent blocked on each one to ``result.data_wait_s``.

    Every step ends in a synchronising loss all-reduce (``float(...)``), so time inside ``next`` is
    time the accelerator has nothing queued: the figure that says whether the loader keeps up.
    """
    it = iter(loader)
    while True:
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        result.data_wait_s += time.perf_counter() - t
        yield batch
