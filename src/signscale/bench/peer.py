"""The plain PyTorch peer of ``signscale bench train --vs-peer``: GTSRB as a practitioner trains it
without signscale, so that "how much faster is the recipe" has an honest other side.

It is written the way a careful user writes it, not handicapped: the whole training set held in
memory as a uint8 tensor, a 5-conv BatchNorm CNN, torchvision v2 ``RandomAffine`` per sample in
DataLoader workers, label smoothing, SGD with Nesterov momentum under a OneCycle schedule (the
pairing OneCycle was made for), batch 128, fp32, a plain loop, and the accuracy on the held-out
images after every epoch. Nothing here imports signscale: the module is the peer, whole, and the
bench hands it tensors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2


@dataclass(frozen=True)
class PeerConfig:
    """The peer's recipe; the defaults are the usual choices for 32 px GTSRB."""

    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1  # OneCycle's peak for SGD + BatchNorm
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    # RandomAffine: the geometry of a sign seen from a moving car, mild enough to keep its meaning
    degrees: float = 10.0
    translate: float = 0.1
    scale: tuple[float, float] = (0.9, 1.1)
    shear: float = 5.0
    workers: int = 2  # DataLoader worker processes (the per-sample augmentation runs there)
    threads: int = 0  # torch intra-op threads of the training process (0: torch's default)
    seed: int = 0
    device: str = "cpu"  # augmentation stays in the CPU workers; batches move to this device

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"PeerConfig: epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")


class PeerCNN(nn.Module):
    """Five 3x3 convolutions with BatchNorm in three stages (32-32 / 64-64 / 128), then a small MLP head."""

    def __init__(self, num_classes: int, size: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, 32), *block(32, 32), nn.MaxPool2d(2),
            *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
            *block(64, 128), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(128 * (size // 8) ** 2, 256),
                                  nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class AugmentedImages(Dataset):
    """uint8 NCHW images in memory with a per-sample transform (run in the DataLoader's workers)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i]), self.labels[i]


@dataclass
class PeerResult:
    curve: list[dict[str, float]] = field(default_factory=list)  # epoch, step, seconds, val_acc per evaluation
    steps: int = 0
    seconds: float = 0.0
    samples_per_s: float = 0.0
    params: int = 0


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - mean) / std


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor,
             std: torch.Tensor, batch_size: int = 1024) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        logits = model(_normalise(images[i:i + batch_size], mean, std))
        correct += int((logits.argmax(1) == labels[i:i + batch_size]).sum())
    return correct / max(1, len(labels))


def train_peer(train_images: torch.Tensor, train_labels: torch.Tensor, val_images: torch.Tensor,
               val_labels: torch.Tensor, cfg: PeerConfig, *, num_classes: int, stop_at: float | None = None,
               on_eval: Callable[[dict[str, float]], None] | None = None) -> PeerResult:
    """Train the peer on uint8 NCHW images; its clock starts here (the data is already in memory).

    Every epoch ends with the accuracy on the held-out images (counted in the clock, as a user's
    script pays for it too); ``stop_at`` ends the run at the first evaluation reaching it.
    """
    old_threads = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(train_images, train_labels, val_images, val_labels, cfg, num_classes, stop_at, on_eval)
    finally:
        torch.set_num_threads(old_threads)


def _train(train_images: torch.Tensor, train_labels: torch.Tensor, val_images: torch.Tensor,
           val_labels: torch.Tensor, cfg: PeerConfig, num_classes: int, stop_at: float | None,
           on_eval: Callable[[dict[str, float]], None] | None) -> PeerResult:
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    pixels = train_images.float() / 255
    mean, std = pixels.mean((0, 2, 3)).view(1, 3, 1, 1), pixels.std((0, 2, 3)).view(1, 3, 1, 1)
    del pixels
    augment = v2.RandomAffine(degrees=cfg.degrees, translate=(cfg.translate, cfg.translate), scale=cfg.scale,
                              shear=cfg.shear, interpolation=v2.InterpolationMode.BILINEAR)
    loader = DataLoader(AugmentedImages(train_images, train_labels, augment), batch_size=cfg.batch_size,
                        shuffle=True, drop_last=True, num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed))
    if len(loader) == 0:
        raise ValueError(f"train_peer: {len(train_labels)} training images make no batch of {cfg.batch_size}")
    device = torch.device(cfg.device)
    mean, std = mean.to(device), std.to(device)
    val_images, val_labels = val_images.to(device), val_labels.to(device)
    model = PeerCNN(num_classes, size=train_images.shape[-1]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * len(loader))
    result = PeerResult(params=sum(p.numel() for p in model.parameters()))
    trained_s = 0.0
    for epoch in range(cfg.epochs):
        model.train()
        t = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(_normalise(x, mean, std)), y, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            result.steps += 1
        trained_s += time.perf_counter() - t
        acc = accuracy(model, val_images, val_labels, mean, std)
        point = {"epoch": epoch + 1, "step": result.steps, "seconds": time.perf_counter() - started, "val_acc": acc}
        result.curve.append(point)
        if on_eval is not None:
            on_eval(point)
        if stop_at is not None and acc >= stop_at:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    result.seconds = time.perf_counter() - started
    result.samples_per_s = result.steps * cfg.batch_size / max(trained_s, 1e-9)
    return result
