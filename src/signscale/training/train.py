"""``train(TrainConfig) -> TrainResult``: a classifier trained on packed datasets.

One process or ``torchrun --nproc-per-node N -m signscale train ...`` on one or many nodes: the
process group comes from torchrun's environment (NCCL with CUDA, gloo on CPU), the model is
wrapped in DDP, and only rank 0 logs and writes. The steps, accumulation, precision, checkpoints,
exact resume and the crash windows closed are the one trainer loop's
(:mod:`signscale.training.trainer`); this module is the classification task: the data, the model
(new, or grown from a model of fewer countries), augmentation, cross-entropy, EMA, a validation per
epoch with its curve and ``best.pt``, the temperature fitted at the end, and the model folder.

A resumed run's per-step losses equal an uninterrupted run's (CPU, fp32), and a run killed anywhere
and resumed leaves the metrics, curve, ``best.pt`` and model an uninterrupted run leaves.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from signscale import calibration, storage
from signscale import config as config_mod
from signscale.config import Precision
from signscale.data.manifest import Manifest
from signscale.data.shards import ShardError
from signscale.data.stream import ShardStream, StreamConfig, StreamLoader
from signscale.labels import COUNTRY_CATALOGUES, LabelSpace
from signscale.models import create_model, grow_head, model_config, model_info
from signscale.training import checkpoint, distributed, precision
from signscale.training.augment import AugmentConfig, BatchAugment, LoaderAugment
from signscale.training.mixing import Mixing, mix
from signscale.training.trainer import LoopConfig, LoopResult, Trainer, TrainError, Validation, resume_url
from signscale.transforms import Preprocess, to_input


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (saved inside every checkpoint and model)."""

    data: tuple[str, ...] = ()  # packed dataset URLs to train on
    val: str = ""  # packed dataset URL for per-epoch validation (held-out tracks)
    out: str = "runs/train"  # run folder: checkpoints, metrics, model
    weights: tuple[float, ...] = ()  # mixing weights for several datasets (empty: all of each)
    country_weights: dict[str, float] = field(default_factory=dict)  # e.g. {de: 1, cn: 2}: per-country mixing
    merge_by: Literal["meaning", "design"] = "meaning"  # how datasets of different countries share outputs
    init_from: str = ""  # model artefact to start from; its head grows to the data's label space
    model: str = "msnet"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    max_steps: int = 0  # stop after this many optimizer steps (0: epochs decide)
    batch_size: int = 256  # per process, per micro-batch
    accumulate: int = 1  # micro-batches per optimizer step
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_frac: float = 0.15
    label_smoothing: float = 0.1
    class_balance: Literal["none", "loss"] = "none"  # loss: weight classes by 1/frequency (from the manifests)
    ema: float = 0.999  # 0: no EMA of the weights
    # > 0: stochastic weight averaging instead of the EMA: the equal mean of the weights after each step
    # of the run's last (1 - swa_from) share; 0: off
    swa_from: float = 0.0
    mixup: float = 0.0  # Beta alpha of mixup (training/mixing.py), e.g. 0.2; 0: off
    cutmix: float = 0.0  # Beta alpha of CutMix, e.g. 1.0; 0: off (with mixup on too, each batch uses one)
    clip_norm: float = 5.0
    precision: Precision = "fp32"
    channels_last: bool = False
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda
    workers: int = 2
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    block_size: int = 256
    on_corrupt: Literal["raise", "skip"] = "raise"  # a data block failing its checksum: stop, or skip it (counted)
    world_invariant: bool = False  # interleave global batches over ranks: N ranks == 1 rank x accumulate N
    checkpoint_every: int = 0  # steps between checkpoints (0: only at epoch ends)
    keep_last: int = 3
    resume: str = ""  # "" | "auto" | checkpoint URL
    log_every: int = 20
    progress: bool = True
    threads: int = 0  # torch intra-op threads per process (0: torch's default)
    # fit the model's temperature on --val at the end (signscale.calibration): calibrated confidence
    calibrate: bool = True

    def __post_init__(self) -> None:
        config_mod.check_precision(self.precision)
        if self.batch_size < 1 or self.accumulate < 1:
            raise config_mod.ConfigError("batch_size and accumulate must be >= 1")
        if self.epochs < 1 and self.max_steps < 1:
            raise config_mod.ConfigError("epochs: must be >= 1 (or set max_steps)")
        if not 0.0 <= self.swa_from < 1.0:
            raise config_mod.ConfigError(f"swa_from: a fraction of the run in [0, 1) (0: off), got {self.swa_from}")
        try:
            Mixing(self.mixup, self.cutmix)
        except ValueError as e:
            raise config_mod.ConfigError(str(e)) from None
        if self.weights and self.country_weights:
            raise config_mod.ConfigError("weights and country_weights: give one of them (country_weights sets "
                                         "each dataset's weight from the countries it holds)")


@dataclass
class TrainResult:
    out: str
    steps: int = 0
    epochs: int = 0
    seconds: float = 0.0
    samples_per_s: float = 0.0
    best_val_acc: float = float("nan")
    final_val_acc: float = float("nan")
    curve: list[dict[str, float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    model_url: str = ""
    params: int = 0
    macs: int = 0
    peak_memory_mb: float = 0.0
    precision: str = "fp32"
    world_size: int = 1
    preempted: bool = False
    skipped_steps: int = 0
    data_wait_s: float = 0.0  # rank 0's time blocked on the loader (the accelerator idles meanwhile)
    loop_s: float = 0.0  # the training loop's wall time, validation included

    def summary(self) -> str:
        val = f", best val acc {self.best_val_acc:.2%}" if not math.isnan(self.best_val_acc) else ""
        stop = " (preempted: checkpoint written, resume with --resume auto)" if self.preempted else ""
        wait = f", waiting for data {self.data_wait_s / self.loop_s:.1%} of the time" if self.loop_s > 0 else ""
        return (f"trained {self.steps} steps / {self.epochs} epoch(s) in {self.seconds:.0f}s at "
                f"{self.samples_per_s:,.0f} samples/s on {self.world_size} process(es), {self.precision}, "
                f"{self.params / 1e6:.2f}M params, {self.macs / 1e6:.1f}M MACs, peak mem "
                f"{self.peak_memory_mb:,.0f} MB{wait}{val}; model: {self.model_url or '-'}{stop}")


# ---------------------------------------------------------------------------------------------
# Pieces


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weights of convs and linears only, never on norms or biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(1, total_steps),
                                                   pct_start=cfg.warmup_frac, div_factor=20, final_div_factor=200)
    if cfg.schedule == "cosine":
        warm = max(1, int(total_steps * cfg.warmup_frac))
        return torch.optim.lr_scheduler.SequentialLR(opt, [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.05, total_iters=warm),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps - warm))], milestones=[warm])
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _ema_update(decay: float) -> Callable[..., None]:
    """EMA with warm-up: the decay grows as (1 + n) / (10 + n) up to ``decay``, so early averages are not
    dominated by the random initial weights (a fixed 0.999 needs thousands of steps to forget them)."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        for e, p in zip(ema_params, params):
            if e.is_floating_point():
                e.lerp_(p.to(e.dtype), 1 - d)
            else:
                e.copy_(p)

    return update


def _averaged(cfg: TrainConfig, model: torch.nn.Module) -> Any:
    """The weight average a run ends with: SWA's equal mean when ``swa_from`` is set, else the EMA, else none.

    Both average the BatchNorm statistics alongside the weights (``use_buffers``), so the average needs no
    extra pass over the data to re-estimate them (SWA's usual ``update_bn``) and resumes exactly.
    """
    if cfg.swa_from > 0:
        return torch.optim.swa_utils.AveragedModel(model, use_buffers=True)
    if cfg.ema > 0:
        return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=_ema_update(cfg.ema), use_buffers=True)
    return None


# ---------------------------------------------------------------------------------------------
# Validation


@torch.no_grad()
def validate(model: torch.nn.Module, loader: StreamLoader, pre: Preprocess, device: torch.device,
             prec: str, channels_last: bool) -> tuple[int, int]:
    """(correct, counted) over this rank's share, padding excluded; summed over ranks by the caller."""
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    for b in loader:
        x = to_input(b["image"].to(device, non_blocking=True), pre, channels_last=channels_last)
        with precision.autocast(prec, device):  # type: ignore[arg-type]
            logits = model(x)
        keep = ~b["pad"].to(device)
        correct += ((logits.argmax(1) == b["label"].to(device)) & keep).sum()
        count += keep.sum()
    distributed.all_reduce_sum(correct)
    distributed.all_reduce_sum(count)
    return int(correct), int(count)


# ---------------------------------------------------------------------------------------------
# The loop


class _Classification:
    """The classification task of :class:`~signscale.training.trainer.Trainer`: augment, cross-entropy,
    a weight average (EMA, or SWA from step ``average_from`` on), and a validation per epoch that keeps the
    curve and the best accuracy."""

    Error = TrainError
    validates = True

    def __init__(self, cfg: TrainConfig, *, model: torch.nn.Module, fwd: torch.nn.Module, ema: Any,
                 augment: BatchAugment, pre: Preprocess, class_weight: torch.Tensor | None, space: LabelSpace,
                 val_loader: StreamLoader | None, device: torch.device, started: float,
                 on_validation: Callable[[dict[str, float]], bool] | None, average_from: int = 0) -> None:
        self.average_from = average_from
        self.mixing = Mixing(cfg.mixup, cfg.cutmix)
        self.cfg, self.model, self.fwd, self.ema, self.augment, self.pre = cfg, model, fwd, ema, augment, pre
        self.class_weight, self.space, self.val_loader, self.device = class_weight, space, val_loader, device
        self.started, self.on_validation = started, on_validation
        self.main = distributed.rank() == 0
        self.best = -1.0
        self.curve: list[dict[str, float]] = []

    @property
    def final(self) -> torch.nn.Module:
        """The weights a run ends with and validates: the average's once it holds a step."""
        averaged = self.ema is not None and int(self.ema.n_averaged) > 0
        return self.ema.module if averaged else self.model

    def inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.get("augmented"):  # 8-bit augmented pixels from the workers: normalise only
            x, y = to_input(batch["image"].to(self.device, non_blocking=True), self.pre), batch["label"].to(self.device)
        else:
            gen = torch.Generator(device=self.device).manual_seed(batch["seed"])
            x, y = self.augment(batch["image"].to(self.device, non_blocking=True), batch["label"].to(self.device), gen)
        if self.mixing.enabled:  # y becomes [B, classes] target probabilities, which cross_entropy takes as is
            x, y = mix(x, y, len(self.space), self.mixing, batch["seed"])
        return (x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x), y

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.fwd(x)
        return F.cross_entropy(logits.float(), y, weight=self.class_weight,
                               label_smoothing=self.cfg.label_smoothing), {}

    def describe(self, batch: dict[str, Any]) -> str:
        return f"a batch of sample ids {batch['id'][:8].tolist()}... from {self.cfg.data[int(batch['dataset'][0])]}"

    def after_step(self, step: int) -> None:
        if self.ema is not None and step > self.average_from:
            self.ema.update_parameters(self.model)

    def state(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict() if self.ema is not None else None, "best": self.best,
                "curve": json.dumps(self.curve), "label_space": json.dumps(self.space.to_dict())}

    def restore(self, state: dict[str, Any]) -> None:
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.best = float(state["best"])
        self.curve = json.loads(state["curve"])

    def validate(self, epoch: int, loader_state: dict[str, Any], step: int, losses: list[float]) -> Validation:
        acc = _run_validation(self.val_loader, self.final, self.pre, self.device, self.cfg)
        seconds = time.perf_counter() - self.started
        self.curve.append({"epoch": _epochs_done(loader_state), "step": step, "seconds": seconds,
                           "val_acc": acc, "loss": losses[-1] if losses else float("nan")})
        if self.main and not math.isnan(acc):
            print(f"epoch {epoch + 1}: val acc {acc:.2%} at {seconds:.0f}s")
        is_best = not math.isnan(acc) and acc > self.best
        self.best = max(self.best, acc) if not math.isnan(acc) else self.best
        stop = self.on_validation is not None and bool(self.on_validation(dict(self.curve[-1])))
        return Validation({"val_acc": acc}, best=is_best, stop=stop)


@distributed.restores_threads
def train(cfg: TrainConfig, on_step: Callable[[int, float, torch.nn.Module], None] | None = None,
          on_validation: Callable[[dict[str, float]], bool] | None = None) -> TrainResult:
    """Train a classifier on packed datasets; see the module docstring.

    ``on_step(step, loss, model)`` is called on every rank after each optimizer step (for tests,
    custom logging or early stopping); ``loss`` is the global batch's mean loss.
    ``on_validation(point)`` is called on every rank with each validation's curve point (epoch, step,
    seconds, val_acc; the same on every rank); True ends the run there as a finished run ends (model
    written): stopping at a target accuracy (``bench train --vs-peer``) costs no more epochs.
    """
    started = time.perf_counter()
    if not cfg.data:
        raise config_mod.ConfigError("data: give at least one packed dataset URL (see `signscale pack`)")
    rank, world, device = distributed.setup(cfg.device, cfg.threads, cfg.seed)
    main = rank == 0
    manifests = [Manifest.load(u) for u in cfg.data]
    init = _load_init(cfg.init_from) if cfg.init_from else None
    space = training_space([m.label_space for m in manifests], cfg.merge_by, init[2] if init else None)
    loader, val_loader = _loaders(cfg, manifests, space)
    train_stream = loader.stream
    pre = Preprocess(image_size=train_stream.image_size)
    model, info = _model(cfg, init, space, train_stream.image_size, device)
    ema = _averaged(cfg, model)
    net: torch.nn.Module = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    opt = _optimizer(cfg, model)
    total_steps, until_steps = _length(cfg, len(loader), main)
    augment = BatchAugment(cfg.augment, pre, torch.as_tensor(space.flip_map()))
    if device.type == "cpu" and cfg.workers > 0:
        # On a CPU box the loader workers augment while the main process trains; on a GPU the
        # augmentation runs on the device after transfer. Same seed -> same pixels either way (the
        # workers hand over 8-bit pixels, so up to half a grey level of rounding).
        train_stream.transform = LoaderAugment(augment)
    task = _Classification(cfg, model=model, fwd=torch.compile(net) if cfg.compile else net, ema=ema,
                           augment=augment, pre=pre, space=space, val_loader=val_loader, device=device,
                           class_weight=_class_weights(cfg.class_balance, manifests, train_stream.label_luts,
                                                       len(space), device),
                           started=started, on_validation=on_validation,
                           average_from=int(cfg.swa_from * total_steps))
    manifest_checksums = [m.checksum() for m in manifests]
    trainer = Trainer(
        LoopConfig(out=cfg.out, total_steps=total_steps, epochs=cfg.epochs, until_steps=until_steps,
                   accumulate=cfg.accumulate, clip_norm=cfg.clip_norm, precision=cfg.precision,
                   checkpoint_every=cfg.checkpoint_every, keep_last=cfg.keep_last, log_every=cfg.log_every,
                   seed=cfg.seed, progress=cfg.progress, name="train", data=tuple(cfg.data)),
        task, model=model, net=net, params=list(model.parameters()), opt=opt,
        sched=_scheduler(cfg, opt, total_steps), scaler=precision.make_scaler(cfg.precision, device), loader=loader,
        device=device, rank=rank, world=world, run_config=cfg, manifests=manifest_checksums)
    _resume(cfg, trainer, task, space, manifest_checksums, main)
    if main:
        storage.write_bytes(storage.join(cfg.out, "config.yaml"), config_mod.dump_yaml(cfg).encode())
    done = trainer.fit(on_step)
    result = _result(cfg, done, task, info, world, device, started)
    fit = None
    if cfg.calibrate and val_loader is not None and not result.preempted:  # every rank: each holds a share
        fit = _fit_temperature(task.final, val_loader, pre, device, cfg)
    if main and not result.preempted:
        _save(cfg, result, task.final, model_config(model), space, pre, manifests, manifest_checksums, fit)
    distributed.barrier()
    return result


def _model(cfg: TrainConfig, init: Any, space: LabelSpace, image_size: int,
           device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network on its device, grown from ``--init-from`` or new, and its size (params, MACs)."""
    model = _grown(init, space) if init is not None else create_model(cfg.model, len(space), **cfg.model_kwargs)
    info = model_info(model, image_size)
    model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, info


def _resume(cfg: TrainConfig, trainer: Trainer, task: _Classification, space: LabelSpace,
            manifest_checksums: list[str], main: bool) -> None:
    """Restore the loop and the task from ``--resume`` (auto: the run folder's latest checkpoint), after
    checking that the checkpoint was written for this config's labels and data."""
    url = resume_url(cfg.resume, cfg.out)
    if not url:
        return
    state = checkpoint.load_checkpoint(url)
    _check_resume(state, cfg, space, manifest_checksums, url)
    trainer.restore(state, url)
    task.restore(state)
    if main:
        print(f"resumed from {url} at step {trainer.result.step} (epoch {trainer.loader.stream.epoch})")


def _save(cfg: TrainConfig, result: TrainResult, final: torch.nn.Module, config: dict[str, Any], space: LabelSpace,
          pre: Preprocess, manifests: list[Manifest], manifest_checksums: list[str], fit: Any) -> None:
    """Write the model artefact (weights, labels, preprocessing, provenance, temperature) and result.json."""
    result.model_url = checkpoint.save_model(
        storage.join(cfg.out, "model"), state_dict=final.state_dict(), model_config=config,
        label_space=space.to_dict(), preprocess=pre.to_dict(),
        metrics={"val_acc": result.final_val_acc, "best_val_acc": result.best_val_acc, "steps": result.steps},
        extra={"train_config": config_mod.to_dict(cfg), "datasets": list(cfg.data),
               "dataset_checksums": manifest_checksums,
               # how the training images were cut from their sources, so scoring a raw source matches
               "data_crop": manifests[0].data.get("pack_config", {}).get("crop", "none"),
               **({calibration.CALIBRATION_KEY: fit.to_dict()} if fit is not None else {})})
    if fit is not None:
        print(f"calibration: {fit.summary()}")
    storage.write_json(storage.join(cfg.out, "result.json"), {k: v for k, v in result.__dict__.items()
                                                              if k != "losses"})


def _length(cfg: TrainConfig, batches_per_epoch: int, main: bool) -> tuple[int, bool]:
    """(steps the run takes, whether it stops at a step count rather than at an epoch's end).

    ``max_steps`` beyond ``epochs`` epochs cannot be reached: the run ends at the epoch cap, and the
    learning-rate schedule is laid out for that length (laid out for ``max_steps`` it would end the run
    with the rate still high).
    """
    by_epochs = max(1, batches_per_epoch // cfg.accumulate) * cfg.epochs
    if not cfg.max_steps:
        return by_epochs, False
    if cfg.max_steps > by_epochs:
        if main:
            print(f"note: max_steps {cfg.max_steps} is more than {cfg.epochs} epoch(s) of "
                  f"{by_epochs // cfg.epochs} steps: the run ends after {by_epochs} steps, its schedule laid out "
                  "for that; raise --epochs to train longer", file=sys.stderr)
        return by_epochs, False
    return cfg.max_steps, True


def _loaders(cfg: TrainConfig, manifests: list[Manifest],
             space: LabelSpace) -> tuple[StreamLoader, StreamLoader | None]:
    """The training loader (datasets mixed by weight, in the run's label space) and the validation's."""
    weights = country_mixing(manifests, cfg.country_weights) if cfg.country_weights else tuple(cfg.weights)
    train_stream = ShardStream(StreamConfig(datasets=tuple(cfg.data), weights=weights,
                                            batch_size=cfg.batch_size, seed=cfg.seed, block_size=cfg.block_size,
                                            remainder="drop", on_corrupt=cfg.on_corrupt,
                                            rank_layout="interleaved" if cfg.world_invariant else "contiguous"),
                               label_space=space)
    val_loader = None
    if cfg.val:
        try:
            vs = ShardStream(StreamConfig(datasets=(cfg.val,), batch_size=512, shuffle=False, remainder="pad",
                                          block_size=cfg.block_size, on_corrupt=cfg.on_corrupt), label_space=space)
        except ShardError as exc:
            raise TrainError(f"val dataset {cfg.val} cannot be scored in the training label space: {exc}") from None
        val_loader = StreamLoader(vs, num_workers=min(cfg.workers, 1))
    return StreamLoader(train_stream, num_workers=cfg.workers), val_loader


def _result(cfg: TrainConfig, done: LoopResult, task: _Classification, info: dict[str, Any], world: int,
            device: torch.device, started: float) -> TrainResult:
    return TrainResult(
        out=cfg.out, steps=done.step, epochs=done.epoch, seconds=time.perf_counter() - started,
        samples_per_s=done.samples_per_s, best_val_acc=task.best if task.best >= 0 else float("nan"),
        final_val_acc=task.curve[-1]["val_acc"] if task.curve else float("nan"), curve=task.curve,
        losses=done.losses, params=info["params"], macs=info["macs"],
        peak_memory_mb=precision.peak_memory_bytes(device) / 2**20, precision=cfg.precision, world_size=world,
        preempted=done.preempted, skipped_steps=done.skipped_steps, data_wait_s=done.data_wait_s,
        loop_s=done.seconds)


def _class_weights(balance: str, manifests: list[Manifest], luts: list[np.ndarray | None], n: int,
                   device: torch.device) -> torch.Tensor | None:
    """Inverse-frequency class weights from the datasets' class histograms, or None.

    Every present class then carries the same total weight, and the average sample keeps weight 1,
    so the learning rate means the same with and without balancing.
    """
    if balance == "none":
        return None
    counts = np.zeros(n, dtype="float64")
    for m, lut in zip(manifests, luts):  # each dataset's histogram, counted in the training label space
        hist = m.class_histogram().astype("float64")
        np.add.at(counts, lut if lut is not None else np.arange(len(hist)), hist)
    present = counts > 0
    w = torch.zeros(n, dtype=torch.float32)
    w[torch.from_numpy(present)] = torch.from_numpy(counts[present].sum() / (present.sum() * counts[present])).float()
    return w.to(device)


def training_space(data_spaces: list[LabelSpace], merge_by: str, model_space: LabelSpace | None = None) -> LabelSpace:
    """The label space a run trains in: the data's, merged across countries, after a starting model's.

    A starting model's outputs come first and keep their ids, so growing its head keeps every old
    row; when the data adds nothing new, the model's space is used as it is (same fingerprint).
    """
    unique = list({s.fingerprint(): s for s in data_spaces}.values())
    if model_space is not None:
        if all((model_space.map_from(s) >= 0).all() for s in unique):
            return model_space
        return LabelSpace.merge([model_space, *unique], by=model_space.by or merge_by)  # type: ignore[arg-type]
    if len(unique) == 1:
        return unique[0]
    return LabelSpace.merge(unique, by=merge_by)  # type: ignore[arg-type]


def country_mixing(manifests: list[Manifest], country_weights: dict[str, float]) -> tuple[float, ...]:
    """Stream mixing weights from per-country weights: a dataset's weight is its samples' country weight.

    The stream's weight w draws about ``w x size`` samples of a dataset per epoch, so weights here
    scale each country's share; countries not named keep weight 1. A catalogue is weighted by its own
    name when given (``tt100k``), else by its country's (``cn`` weights TSRD23 and TT100K alike).
    """
    country_of = {cat: country for country, cats in COUNTRY_CATALOGUES.items() for cat in cats}
    out = []
    for m in manifests:
        countries = m.label_space.countries()  # the catalogues its labels come from
        ws = {country_weights.get(c, country_weights.get(country_of.get(c, c), 1.0)) for c in countries}
        if len(ws) > 1:
            raise config_mod.ConfigError(f"country_weights: {m.root} mixes countries {countries} with different "
                                         "weights; pack one dataset per country to weight them apart")
        out.append(float(ws.pop()))
    return tuple(out)


def _load_init(url: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], LabelSpace]:
    state, meta = checkpoint.load_model_artefact(url)
    return state, meta, LabelSpace.from_dict(meta["label_space"])


def _grown(init: tuple[dict[str, torch.Tensor], dict[str, Any], LabelSpace], space: LabelSpace) -> torch.nn.Module:
    """The starting model with one output per class of ``space``; old classes keep their head rows."""
    state, meta, old = init
    rows = [-1] * len(space)
    for j, i in enumerate(space.map_from(old)):
        if i >= 0:
            rows[int(i)] = j
    return grow_head(meta["model_config"], state, rows)


def _run_validation(val_loader: StreamLoader | None, model: torch.nn.Module, pre: Preprocess,
                    device: torch.device, cfg: TrainConfig) -> float:
    if val_loader is None:
        return float("nan")
    val_loader.set_epoch(0)
    correct, count = validate(model, val_loader, pre, device, cfg.precision, cfg.channels_last)
    return correct / count if count else float("nan")


@torch.no_grad()
def _fit_temperature(model: torch.nn.Module, loader: StreamLoader, pre: Preprocess, device: torch.device,
                     cfg: TrainConfig) -> calibration.TemperatureFit | None:
    """The temperature of the final weights, fitted on the whole validation set (every rank's share)."""
    model.eval()
    loader.set_epoch(0)
    logits, labels = [], []
    for b in loader:
        x = to_input(b["image"].to(device, non_blocking=True), pre, channels_last=cfg.channels_last)
        with precision.autocast(cfg.precision, device):  # type: ignore[arg-type]
            z = model(x).float()
        keep = ~b["pad"]
        logits.append(z.cpu()[keep])
        labels.append(b["label"][keep])
    parts = distributed.all_gather_object((logits, labels)) if distributed.is_initialized() else [(logits, labels)]
    z_all = [t for p in parts for t in p[0]]
    y_all = [t for p in parts for t in p[1]]
    if not z_all or sum(len(t) for t in y_all) == 0:
        return None
    return calibration.fit_temperature(torch.cat(z_all), torch.cat(y_all), data=cfg.val)


def _epochs_done(loader_state: dict[str, Any]) -> float:
    """Epochs done at a loader state, fractional mid-epoch: the same number whether or not the run resumed."""
    if loader_state["remaining"] is None:
        return float(loader_state["epoch"])
    left = sum(b - a for a, b in loader_state["remaining"])
    return loader_state["epoch"] + 1 - left / max(1, loader_state["total"])


def _check_resume(state: dict[str, Any], cfg: TrainConfig, space: Any, checksums: list[str], url: str) -> None:
    saved_space = json.loads(state["label_space"])
    if saved_space != space.to_dict():
        raise TrainError(f"{url}: the checkpoint's label space ({saved_space['name']}, "
                         f"{len(saved_space['classes'])} classes) differs from the data's ({space.name}, "
                         f"{len(space)} classes); resume on the same datasets")
    if list(state["manifests"]) != checksums:
        raise TrainError(f"{url}: the training datasets changed since this checkpoint (manifest checksums differ); "
                         "resume on the same datasets or start a new run")
    if state["config"].get("model") != cfg.model:
        raise TrainError(f"{url}: checkpoint is of model {state['config'].get('model')!r}, config says {cfg.model!r}")
