"""``train_detector(DetTrainConfig) -> DetTrainResult``: FCOS sign detector training on packed scenes.

Same machinery as the classifier trainer: the process group from torchrun's environment
(:mod:`signscale.training.distributed`; gloo on CPU, NCCL on GPUs) with DDP, autocast and the one
optimizer-step function of :mod:`signscale.training.precision` (bf16/fp16), checkpoints of tensors and plain
data at any storage URL (:mod:`signscale.training.checkpoint`), and the exactly-once, resumable stream
(:class:`signscale.data.scene_shards.SceneStream` over :mod:`signscale.data.stream`).

**Tiles, not whole scenes.** Training crops a ``tile`` (default 256x192) from each scene, centred
on a random sign most of the time. Convolutions are translation-invariant, so the detector still
runs on whole scenes at inference; a tile costs a third of a 512x320 scene and holds most of its
signs, so a CPU-second buys ~3x more positive examples. ``tile=0`` trains on whole scenes.

**Real roads.** A detector trained on rendered scenes fires on real foliage, windows and shop fronts.
The recipe for real frames (docs/detection.md) starts from such a detector (``init_from``) and
fine-tunes on real frames, optionally mixed with rendered ones (``data_weights``), with what real
cameras need: scale jitter so signs of 8-40 px all occur (``scale``), colour, blur and JPEG
re-encoding (``photometric``, ``blur_p``, ``jpeg_p``), tiles off the signs for background
(``1 - sign_tiles``) and tiles centred on mined false alarms (``negatives``, the ``false_alarms.json``
of ``signscale evaluate-scenes``; ``negative_tiles`` of them).

**Exact resume.** The tile positions, flips and everything random in a step are drawn from
``(seed, step, rank)``; the checkpoint holds model, optimizer, scheduler, scaler, loader position
and RNG states, so a resumed run continues with the batches and crops an uninterrupted run sees.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from signscale import config as config_mod
from signscale import images, storage
from signscale.config import Precision
from signscale.data.manifest import Manifest
from signscale.data.scene_shards import SceneStream
from signscale.data.stream import StreamConfig, StreamLoader
from signscale.detection.detector import build_detector, detector_config, detector_labels, make_config
from signscale.labels import LabelSpace
from signscale.training import checkpoint, distributed, precision
from signscale.training.trainer import LoopConfig, Trainer, TrainError, Validation, resume_url
from signscale.transforms import Preprocess


class DetTrainError(TrainError):
    """Detector training cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class DetTrainConfig:
    """Everything a detector training run depends on (saved inside every checkpoint and model)."""

    data: tuple[str, ...] = ()  # packed scene dataset URLs (signscale.data.scene_shards.pack_scenes)
    out: str = "runs/detector"
    backbone: str = ""  # a signscale classifier model folder to initialise from ("": random msnet)
    init_from: str = ""  # a detector model folder to fine-tune (its architecture; backbone is then unused)
    classes: Literal["sign", "category"] = "sign"
    fpn_channels: int = 64
    head_convs: int = 2
    freeze_stages: int = 1  # classifier stages kept fixed (the full-resolution one by default)
    tile: tuple[int, int] = (256, 192)  # training crop (w, h); (0, 0): whole scenes
    flip: bool = True  # horizontal flips (class-agnostic "sign" and categories are flip-invariant)
    data_weights: tuple[float, ...] = ()  # stream mixing weights per dataset (empty: each scene once per epoch)
    scale: tuple[float, float] = (1.0, 1.0)  # scene rescale range per tile (log-uniform): sign sizes seen
    photometric: float = 0.0  # brightness / contrast / saturation jitter strength (0: none, 1: +-40%)
    blur_p: float = 0.0  # share of tiles blurred (Gaussian, sigma 0.4-1.4 px)
    jpeg_p: float = 0.0  # share of tiles re-encoded as JPEG (quality 25-90)
    sign_tiles: float = 0.8  # share of tiles centred on a sign (the rest: random, mostly background)
    negatives: str = ""  # false_alarms.json of evaluate-scenes: hard negatives to centre tiles on
    negative_tiles: float = 0.0  # share of tiles centred on a hard negative (scenes that have one)
    epochs: int = 1
    max_steps: int = 0  # optimizer steps to take (0: ``epochs`` decide); the LR schedule spans them
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    clip_norm: float = 10.0
    precision: Precision = "fp32"
    device: str = "auto"
    workers: int = 1
    seed: int = 0
    checkpoint_every: int = 0  # steps (0: at the end only)
    keep_last: int = 2
    resume: str = ""  # "" | "auto" | checkpoint URL
    log_every: int = 10
    threads: int = 0
    max_minutes: float = 0.0  # stop (with a checkpoint) after this much wall time; 0: no limit
    progress: bool = True  # a progress bar on a terminal (elsewhere one line every log_every steps)

    def __post_init__(self) -> None:
        config_mod.check_precision(self.precision)
        if not self.data:
            raise config_mod.ConfigError("data: give at least one packed scene dataset URL")
        if self.batch_size < 1:
            raise config_mod.ConfigError("batch_size: must be >= 1")
        if self.epochs < 1 and self.max_steps < 1:
            raise config_mod.ConfigError("epochs: must be >= 1 (or set max_steps)")
        if len(self.tile) != 2 or min(self.tile) < 0 or (0 in self.tile and self.tile != (0, 0)):
            raise config_mod.ConfigError(f"tile: expected (width, height) > 0 or (0, 0), got {self.tile}")
        if self.classes not in ("sign", "category"):
            raise config_mod.ConfigError(f"classes: expected sign or category, got {self.classes!r}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise config_mod.ConfigError(f"scale: expected (low, high) with 0 < low <= high, got {self.scale}")
        for name in ("photometric", "blur_p", "jpeg_p", "sign_tiles", "negative_tiles"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise config_mod.ConfigError(f"{name}: expected a value in 0..1, got {getattr(self, name)}")
        if self.sign_tiles + self.negative_tiles > 1.0:
            raise config_mod.ConfigError("sign_tiles + negative_tiles: must be <= 1 (the rest are random tiles)")
        if self.negative_tiles and not self.negatives:
            raise config_mod.ConfigError("negative_tiles: give negatives=URL of a false_alarms.json to centre them on")
        if self.data_weights and len(self.data_weights) != len(self.data):
            raise config_mod.ConfigError(
                f"data_weights: {len(self.data_weights)} weights for {len(self.data)} datasets"
            )


@dataclass
class DetTrainResult:
    out: str
    steps: int = 0
    seconds: float = 0.0
    scenes_per_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    model_url: str = ""
    world_size: int = 1
    precision: str = "fp32"
    stopped_early: bool = False

    def summary(self) -> str:
        stop = " (time limit: checkpoint written, resume with resume=auto)" if self.stopped_early else ""
        last = f", last loss {np.mean(self.losses[-10:]):.3f}" if self.losses else ""
        return (f"trained detector {self.steps} steps in {self.seconds:.0f}s at {self.scenes_per_s:.1f} tiles/s on "
                f"{self.world_size} process(es), {self.precision}{last}; model: {self.model_url or '-'}{stop}")


# ---------------------------------------------------------------------------------------------
# Pieces


def crop_tile(image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, tile: tuple[int, int],
              rng: np.random.Generator, *, flip: bool, sign_p: float = 0.8, negatives: np.ndarray | None = None,
              negative_p: float = 0.0, scale: tuple[float, float] = (1.0, 1.0)
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (w, h) crop of an HxWx3 scene, centred on a random sign ``sign_p`` of the time, on a hard
    negative ``negative_p`` of the time (when the scene has one), else anywhere; boxes clipped, and
    those keeping under half their area dropped (a half sign is not a sign to find). With ``scale``
    other than (1, 1) the scene is first zoomed by a log-uniform factor, so the signs' sizes vary."""
    H, W = image.shape[:2]
    s = 1.0 if scale == (1.0, 1.0) else float(np.exp(rng.uniform(np.log(scale[0]), np.log(scale[1]))))
    tw, th = tile if tile != (0, 0) else (W * s, H * s)
    tw, th = int(min(round(tw / s), W)), int(min(round(th / s), H))  # the window in scene pixels
    has_negatives = negatives is not None and len(negatives) > 0 and negative_p > 0
    r = rng.random() if len(boxes) or has_negatives else 1.0
    centre = None
    if len(boxes) and r < sign_p:
        centre = boxes[int(rng.integers(len(boxes)))].numpy()
    elif has_negatives and r < sign_p + negative_p:
        centre = negatives[int(rng.integers(len(negatives)))]
    if centre is not None:
        b = centre
        cx, cy = (b[0] + b[2]) / 2 + rng.uniform(-0.35, 0.35) * tw, (b[1] + b[3]) / 2 + rng.uniform(-0.35, 0.35) * th
        x0, y0 = int(np.clip(cx - tw / 2, 0, W - tw)), int(np.clip(cy - th / 2, 0, H - th))
    else:
        x0, y0 = int(rng.integers(0, W - tw + 1)), int(rng.integers(0, H - th + 1))
    img = image[y0:y0 + th, x0:x0 + tw]
    if len(boxes):
        shifted = boxes - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
        clipped = shifted.clone()
        clipped[:, 0::2] = clipped[:, 0::2].clamp(0, tw)
        clipped[:, 1::2] = clipped[:, 1::2].clamp(0, th)
        area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
        kept = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
        keep = (kept >= 0.5 * area) & (clipped[:, 2] - clipped[:, 0] >= 2) & (clipped[:, 3] - clipped[:, 1] >= 2)
        boxes, labels = clipped[keep], labels[keep]
    if s != 1.0:
        img, boxes = _zoom(img, boxes, s)
        tw = img.shape[1]
    if flip and rng.random() < 0.5:
        img = img.flip(1)
        if len(boxes):
            boxes = torch.stack([tw - boxes[:, 2], boxes[:, 1], tw - boxes[:, 0], boxes[:, 3]], dim=1)
    return img, boxes, labels


def _zoom(img: torch.Tensor, boxes: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """An HxWx3 uint8 tile resized by ``s`` (antialiased when shrinking) and its boxes with it."""
    h, w = img.shape[:2]
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    x = img.permute(2, 0, 1)[None].float()
    x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bilinear", antialias=s < 1, align_corners=False)
    out = x[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
    if len(boxes):
        boxes = boxes * torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=boxes.dtype)
    return out, boxes


def camera_augment(img: torch.Tensor, rng: np.random.Generator, *, photometric: float, blur_p: float,
                   jpeg_p: float) -> torch.Tensor:
    """What a real camera does to a tile, drawn from ``rng``: colour and exposure, defocus/motion-ish
    blur, JPEG re-encoding. Synthetic scenes are clean PNGs; real frames are none of that."""
    from torchvision.transforms.v2 import functional as F

    x = img.permute(2, 0, 1)  # 3xHxW uint8
    if photometric > 0:
        b, c, sat = (float(v) for v in 1 + photometric * 0.4 * rng.uniform(-1, 1, size=3))
        x = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(x, b), c), sat)
    if blur_p > 0 and rng.random() < blur_p:
        sigma = float(rng.uniform(0.4, 1.4))
        x = F.gaussian_blur(x, kernel_size=[5, 5], sigma=[sigma, sigma])
    out = x.permute(1, 2, 0).contiguous()
    if jpeg_p > 0 and rng.random() < jpeg_p:
        out = torch.from_numpy(images.jpeg_roundtrip(out.numpy(), int(rng.integers(25, 91))))
    return out


def to_detector_input(images: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """HxWx3 uint8 -> 3xHxW float in [0, 1] (the detector's transform normalises)."""
    return [im.to(device, non_blocking=True).permute(2, 0, 1).float().div_(255.0) for im in images]


def read_negatives(url: str) -> dict[str, np.ndarray]:
    """{scene key: float64 [N, 4] boxes} from a false_alarms.json (scores dropped)."""
    from signscale.data.sources.scene_crops import read_false_alarms

    return {k: np.asarray(v, dtype=np.float64).reshape(-1, 4) for k, v in read_false_alarms(url).items()}


def _lr_lambda(cfg: DetTrainConfig, total: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return 0.05 + 0.95 * step / max(1, cfg.warmup_steps)
        t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def _initial_model(cfg: DetTrainConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Detector with its backbone from the classifier at ``cfg.backbone`` (or a random msnet)."""
    from signscale.models import create_model, model_config

    if cfg.init_from:
        model, meta = load_detector(cfg.init_from)
        model.train()
        model.backbone.freeze(cfg.freeze_stages)
        return model, meta["model_config"]
    if cfg.backbone:
        try:
            classifier, meta = checkpoint.load_model(cfg.backbone, classifier=True)
        except checkpoint.CheckpointError as exc:
            raise DetTrainError(f"backbone={cfg.backbone}: {exc}") from None
        mc, pre = meta["model_config"], meta["preprocess"]
    else:
        classifier = create_model("msnet", 43)
        mc, pre = model_config(classifier), Preprocess().to_dict()
    dcfg = make_config(mc, preprocess=pre, classes=cfg.classes, fpn_channels=cfg.fpn_channels,
                       head_convs=cfg.head_convs)
    model = build_detector(dcfg, classifier)
    model.backbone.freeze(cfg.freeze_stages)
    return model, dcfg


def save_detector(url: str, model: torch.nn.Module, space: LabelSpace, metrics: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None) -> str:
    """A detector model artefact (same folder format as classifiers; ``kind`` tells them apart)."""
    dcfg = detector_config(model)
    return checkpoint.save_model(url, state_dict=model.state_dict(), model_config=dcfg,
                                 label_space=space.to_dict(), preprocess={"mean": dcfg["mean"], "std": dcfg["std"]},
                                 metrics=metrics or {}, extra={"kind": "signscale.detector", **(extra or {})})


def load_detector(url: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(detector in eval mode, its model.json metadata) from a detector model folder."""
    from signscale.detection.detector import DetectorError

    sd, meta = checkpoint.load_model_artefact(url)
    if meta.get("kind") != "signscale.detector":
        raise DetectorError(f"{url}: not a detector model (kind={meta.get('kind')!r}); train one with "
                            "`signscale train-detector`")
    model = build_detector(meta["model_config"])
    model.load_state_dict(sd)
    model.eval()
    return model, meta


# ---------------------------------------------------------------------------------------------
# The loop


class _Detection:
    """The detection task of :class:`~signscale.training.trainer.Trainer`: a tile cropped from each scene
    (around a sign, off the signs, or on a mined false alarm), camera augmentation, the FCOS losses."""

    Error = DetTrainError
    validates = False

    def __init__(self, cfg: DetTrainConfig, net: torch.nn.Module, dcfg: dict[str, Any], space: LabelSpace,
                 negatives: dict[str, np.ndarray], device: torch.device) -> None:
        self.cfg, self.net, self.dcfg, self.space = cfg, net, dcfg, space
        self.negatives, self.device = negatives, device

    def inputs(self, batch: dict[str, Any]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        cfg = self.cfg
        rng = np.random.default_rng(int(torch.randint(2**62, ())))  # from the loop's per-step seed
        imgs, targets = [], []
        for key, im, tg in zip(batch["keys"], batch["images"], batch["targets"]):
            im2, bx, lb = crop_tile(im, tg["boxes"], tg["labels"], tuple(cfg.tile), rng, flip=cfg.flip,
                                    sign_p=cfg.sign_tiles, negatives=self.negatives.get(key),
                                    negative_p=cfg.negative_tiles, scale=tuple(cfg.scale))
            if cfg.photometric or cfg.blur_p or cfg.jpeg_p:
                im2 = camera_augment(im2, rng, photometric=cfg.photometric, blur_p=cfg.blur_p, jpeg_p=cfg.jpeg_p)
            imgs.append(im2)
            targets.append({"boxes": bx.to(self.device),
                            "labels": detector_labels(lb, cfg.classes, self.space).to(self.device)})
        return to_detector_input(imgs, self.device), targets

    def loss(self, x: list[torch.Tensor], y: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, dict[str, float]]:
        losses = self.net(x, y)
        return sum(v.float() for v in losses.values()), {k: float(v.detach()) for k, v in losses.items()}

    def describe(self, batch: dict[str, Any]) -> str:
        return f"scene ids {batch['id'][:8].tolist()}"

    def after_step(self, step: int) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {"detector": json.dumps(self.dcfg)}

    def validate(self, epoch: int, loader_state: dict[str, Any], step: int, losses: list[float]) -> Validation:
        raise NotImplementedError("the detector is scored by `signscale evaluate-scenes`, not per epoch")


@distributed.restores_threads
def train_detector(cfg: DetTrainConfig) -> DetTrainResult:
    """Train the detector; see the module docstring. Only rank 0 writes."""
    started = time.perf_counter()
    rank, world, device = distributed.setup(cfg.device, cfg.threads, cfg.seed)
    main = rank == 0
    manifests = [Manifest.load(u) for u in cfg.data]
    space = manifests[0].label_space
    stream = SceneStream(StreamConfig(datasets=tuple(cfg.data), weights=tuple(cfg.data_weights),
                                      batch_size=cfg.batch_size, seed=cfg.seed, block_size=16, window_blocks=16,
                                      remainder="drop"))
    loader = StreamLoader(stream, num_workers=cfg.workers, pin_memory=False)
    if len(loader) == 0:
        raise DetTrainError(f"{cfg.data}: fewer scenes than one batch of {cfg.batch_size} per process")
    model, dcfg = _initial_model(cfg)
    model.to(device)
    net: torch.nn.Module = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.max_steps or len(loader) * cfg.epochs
    checksums = [m.checksum() for m in manifests]
    task = _Detection(cfg, net, dcfg, space, read_negatives(cfg.negatives) if cfg.negatives else {}, device)
    trainer = Trainer(
        LoopConfig(out=cfg.out, total_steps=total, epochs=cfg.epochs if not cfg.max_steps else 2**31,
                   until_steps=True, clip_norm=cfg.clip_norm, precision=cfg.precision,
                   checkpoint_every=cfg.checkpoint_every, keep_last=cfg.keep_last, log_every=cfg.log_every,
                   max_seconds=cfg.max_minutes * 60, seed=cfg.seed, progress=cfg.progress, name="train-detector",
                   echo=True, data=tuple(cfg.data)),
        task, model=model, net=net, params=params, opt=opt,
        sched=torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total)),
        scaler=precision.make_scaler(cfg.precision, device), loader=loader, device=device, rank=rank, world=world,
        run_config=cfg, manifests=checksums)
    url = resume_url(cfg.resume, cfg.out)
    if url:
        state = checkpoint.load_checkpoint(url)
        if state.get("manifests") != checksums:
            raise DetTrainError(f"{url} was written for other data ({state.get('manifests')}); resume with the "
                                "same datasets or start a new run folder")
        trainer.restore(state, url)
        if main:
            print(f"resumed from {url} at step {trainer.result.step}")
    if main:
        storage.write_bytes(storage.join(cfg.out, "config.yaml"), config_mod.dump_yaml(cfg).encode())
    done = trainer.fit()
    result = DetTrainResult(out=cfg.out, steps=done.step, seconds=time.perf_counter() - started,
                            scenes_per_s=done.samples_per_s, losses=done.losses, world_size=world,
                            precision=cfg.precision, stopped_early=done.timed_out or done.preempted)
    if main and not done.preempted:
        result.model_url = save_detector(storage.join(cfg.out, "model"), model, space,
                                         metrics={"steps": done.step, "final_loss": float(np.mean(done.losses[-20:]))
                                                  if done.losses else None},
                                         extra={"train_config": config_mod.to_dict(cfg), "datasets": list(cfg.data),
                                                "dataset_checksums": checksums})
    distributed.barrier()
    return result
