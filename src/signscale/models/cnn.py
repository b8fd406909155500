"""Convolutional classifiers for small, square traffic-sign crops (GTSRB: 32x32, sometimes 48x48).

Every model here shares one contract so the trainer, the detector and continual learning can treat
them alike:

* ``features(x)`` returns the pooled feature vector (``num_features`` wide) that the head reads;
* ``feature_maps(x)`` returns each stage's output map, finest first, for a detector's neck;
* ``head`` is the final ``nn.Linear``, so a later step can grow it to more classes;
* in eval mode ``model(x) == model.head(model.features(x))`` (training adds dropout in between);
* any square input that survives the 2x poolings works (at least 8 px for three stages; GTSRB
  uses 32 or 48), because the last spatial reduction is an adaptive pool;
* nothing here names a device, a dtype or a process: autocast, ``channels_last`` and DDP are the
  trainer's business.

The models:

``small_cnn``
    Three conv-BN-ReLU blocks, global pooling, linear. A baseline that trains in seconds.
``msnet``
    A multi-scale CNN after Sermanet & LeCun (2011, "Traffic sign recognition with multi-scale
    convolutional networks"): the classifier sees the pooled output of *every* stage, not only the
    last, so coarse shape/colour cues from early layers reach it directly.
``stn_msnet``
    ``msnet`` behind a spatial transformer (Jaderberg et al. 2015) that learns to re-centre, scale
    and rotate the crop first; Arcos-García et al. (2018, Neural Networks 99) reach 99.71% on GTSRB
    with spatial transformers + CNN. Same class as ``msnet`` with ``stn=True``.
``msnet`` with ``contrast="local"``
    Contrast normalisation as the model's first layer (:class:`ContrastNorm`): each image is
    standardised as a whole, then each pixel against its neighbourhood (Jarrett et al. 2009), as the
    spatial-transformer GTSRB record does. Being a layer, it runs wherever the model runs (training,
    evaluation, predict, serve, ONNX), with no second preprocessing path to keep in step.
``resnet18_small``
    torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool (the CIFAR adaptation), so a
    32x32 crop keeps its resolution into the first residual stage. A heavy reference point.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNAct(nn.Sequential):
    """Conv (no bias: BN's shift replaces it) -> BatchNorm -> ReLU, 'same' padding."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class Stage(nn.Sequential):
    """``depth`` conv blocks at one resolution, then 2x max-pool and optional spatial dropout.

    Dropout2d drops whole channels: neighbouring pixels are strongly correlated, so dropping single
    activations (plain Dropout) regularises convolutional maps very little.
    """

    def __init__(self, c_in: int, c_out: int, *, depth: int, dropout: float) -> None:
        blocks: list[nn.Module] = [ConvBNAct(c_in if i == 0 else c_out, c_out) for i in range(depth)]
        blocks.append(nn.MaxPool2d(2))
        if dropout > 0:
            blocks.append(nn.Dropout2d(dropout))
        super().__init__(*blocks)


def stage_maps(stages: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Run ``x`` through the stages in turn and keep every stage's output map, finest first."""
    maps = []
    for stage in stages:
        x = stage(x)
        maps.append(x)
    return maps


def _check_common(num_classes: int, widths: Sequence[int], dropout: float) -> None:
    """Fail at construction, naming the argument, instead of with a shape error in the first forward."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not widths or any(int(w) < 1 for w in widths):
        raise ValueError(f"widths must be a non-empty list of positive ints, got {list(widths)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


class SmallCNN(nn.Module):
    """A fast baseline: one conv-BN-ReLU block and a 2x pool per stage, global average pool, linear.

    Meant for smoke tests, CI and pipeline checks, where a model that learns GTSRB to ~95% within a
    couple of epochs on a laptop is worth more than the last percent.
    """

    def __init__(self, num_classes: int, *, widths: Sequence[int] = (32, 64, 128), dropout: float = 0.0) -> None:
        super().__init__()
        _check_common(num_classes, widths, dropout)
        widths = [int(w) for w in widths]
        self.stages = nn.ModuleList(
            Stage(c_in, c_out, depth=1, dropout=0.0) for c_in, c_out in zip([3, *widths[:-1]], widths)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = widths[-1]
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(self.num_features, num_classes)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output map of every stage, finest first."""
        return stage_maps(self.stages, x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.feature_maps(x)[-1]), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.features(x)))


class AffineSTN(nn.Module):
    """Spatial transformer: a small localisation net predicts an affine warp applied to the input.

    The localisation net works at half resolution (a warp needs only coarse evidence, and this keeps
    it to a few percent of the classifier's cost). Its last layer starts at zero weight and identity
    bias, so an untrained STN passes the image through unchanged and training starts from the plain
    CNN rather than from random warps.
    """

    def __init__(self, *, widths: Sequence[int] = (16, 32), hidden: int = 64) -> None:
        super().__init__()
        c_in, layers = 3, [nn.MaxPool2d(2)]
        for c_out in widths:
            layers += [ConvBNAct(c_in, c_out, kernel_size=5), nn.MaxPool2d(2)]
            c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(1), nn.Linear(c_in * 16, hidden), nn.ReLU(inplace=True)]
        self.loc = nn.Sequential(*layers)
        self.theta = nn.Linear(hidden, 6)
        nn.init.zeros_(self.theta.weight)
        with torch.no_grad():
            self.theta.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.theta(self.loc(x)).view(-1, 2, 3)
        # Under autocast the linear layers return low precision; a bfloat16 sampling grid is off by
        # up to ~0.1 px at 32 px, so the grid is built in the input's own dtype (whatever that is).
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # grid_sample always returns NCHW-contiguous; hand the next conv the layout the caller chose,
        # or a channels_last model pays a layout conversion in every conv forward and backward.
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        return out


CONTRAST_MODES = ("none", "global", "local")


class ContrastNorm(nn.Module):
    """Contrast normalisation, parameter-free: dim and glaring crops of one sign look alike after it.

    ``global`` standardises each image by its own mean (per channel) and standard deviation (over all
    channels, so the ratio of colours, a sign's most telling cue, is kept). ``local`` then subtracts a
    Gaussian-weighted neighbourhood mean and divides by the neighbourhood's deviation, floored at its
    image-wide mean (Jarrett et al. 2009), so a washed-out rim on a bright sky is lifted as much as
    the pictogram in the shade. ``sigma`` is in pixels of the input.
    """

    def __init__(self, mode: str = "local", *, sigma: float = 2.0, eps: float = 1e-6) -> None:
        super().__init__()
        if mode not in CONTRAST_MODES:
            raise ValueError(f"contrast must be one of {', '.join(CONTRAST_MODES)}, got {mode!r}")
        if sigma <= 0:
            raise ValueError(f"contrast_sigma must be > 0 pixels, got {sigma}")
        self.mode, self.eps = mode, eps
        radius = max(1, round(2 * sigma))
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
        taps = taps / taps.sum()
        # A buffer, not a parameter: the kernel is fixed, and it travels with the state dict and device.
        self.register_buffer("taps", taps, persistent=False)

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian, depthwise, edges reflected (a zero border would darken the rim)."""
        c, r = x.shape[1], self.taps.numel() // 2
        k = self.taps.to(x.dtype)
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return x
        x = x - x.mean(dim=(2, 3), keepdim=True)
        x = x / (x.std(dim=(1, 2, 3), keepdim=True) + self.eps)
        if self.mode == "global":
            return x
        x = x - self._blur(x)
        local = self._blur(x.pow(2).mean(dim=1, keepdim=True)).clamp_min(0).sqrt()
        floor = local.mean(dim=(2, 3), keepdim=True)
        return x / torch.maximum(local, floor).clamp_min(self.eps)


class MultiScaleNet(nn.Module):
    """Multi-scale CNN (Sermanet & LeCun 2011): every stage's output feeds the classifier.

    Each stage's map is average-pooled to a ``branch_grid`` x ``branch_grid`` grid, flattened and
    concatenated, so the classifier sees early, high-resolution cues (colour, rim shape) next to the
    late, abstract ones, and the feature width is the same for 32x32 and 48x48 inputs. A grid of 2
    keeps a coarse layout (which half of a sign the arrow is in: ``keep_left`` vs ``keep_right``),
    which a global 1x1 pool would throw away.

    The concatenation goes through one hidden fully connected layer (``hidden`` units) whose output is
    the feature vector; ``hidden=0`` feeds the concatenation to the head directly.

    ``depth`` is the number of conv blocks per stage (one int for all). The default (1, 1, 2) with
    widths 32-64-128 costs 20M MACs per 32x32 image and trains at ~1,250 img/s on two CPU cores
    (batch 256, fp32, channels_last); two blocks in every stage cost 39M MACs and ~680 img/s. The
    one extra block goes to the last stage, where it adds the most capacity (128 channels) for the
    least activation traffic (8x8), and the time saved buys epochs: a 15-minute CPU run sees ~30
    epochs of GTSRB instead of ~17. Where compute is not the limit, ``depth=2`` adds capacity.

    ``stn=True`` puts an :class:`AffineSTN` in front (registered as ``stn_msnet``); ``feature_maps``
    and ``features`` then include the warp, so a detector or a grown head sees the rectified crop
    exactly as the classifier does. ``stn_widths`` and ``stn_hidden`` size its localisation net and
    are ignored without it.

    ``contrast`` ("none", "global" or "local") puts a :class:`ContrastNorm` first, before the STN.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        widths: Sequence[int] = (32, 64, 128),
        depth: int | Sequence[int] = (1, 1, 2),
        branch_grid: int = 2,
        hidden: int = 256,
        stage_dropout: float = 0.1,
        dropout: float = 0.3,
        stn: bool = False,
        stn_widths: Sequence[int] = (16, 32),
        stn_hidden: int = 64,
        contrast: str = "none",
        contrast_sigma: float = 2.0,
    ) -> None:
        super().__init__()
        _check_common(num_classes, widths, dropout)
        depths = [int(depth)] * len(widths) if isinstance(depth, int) else [int(d) for d in depth]
        if len(depths) != len(widths) or min(depths) < 1:
            raise ValueError(f"depth must be a positive int or one positive int per stage "
                             f"({len(widths)} stages), got {depth}")
        if branch_grid < 1:
            raise ValueError(f"branch_grid must be >= 1, got {branch_grid}")
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0 (0: no hidden layer), got {hidden}")
        if not 0.0 <= stage_dropout < 1.0:
            raise ValueError(f"stage_dropout must be in [0, 1), got {stage_dropout}")
        widths = [int(w) for w in widths]
        self.contrast = ContrastNorm(contrast, sigma=contrast_sigma)
        # Only built when asked for, so an msnet state dict has no unused STN tensors.
        self.stn = AffineSTN(widths=[int(w) for w in stn_widths], hidden=stn_hidden) if stn else None
        self.stages = nn.ModuleList(
            Stage(c_in, c_out, depth=d, dropout=stage_dropout)
            for c_in, c_out, d in zip([3, *widths[:-1]], widths, depths)
        )
        self.branch_pool = nn.AdaptiveAvgPool2d(branch_grid)
        concat = sum(widths) * branch_grid * branch_grid
        if hidden:
            # Dropout on the ~900 concatenated inputs is where this model can overfit GTSRB's ~40k
            # crops of ~1,300 physical signs; BatchNorm1d replaces the bias, as after every conv.
            self.neck: nn.Module = nn.Sequential(
                nn.Dropout(dropout),
                nn.Linear(concat, hidden, bias=False),
                nn.BatchNorm1d(hidden),
                nn.ReLU(inplace=True),
            )
            self.num_features = hidden
        else:
            self.neck = nn.Identity()
            self.num_features = concat
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(self.num_features, num_classes)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output map of every stage, finest first (what a detector's neck would consume)."""
        x = self.contrast(x)
        if self.stn is not None:
            x = self.stn(x)
        return stage_maps(self.stages, x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        branches = [torch.flatten(self.branch_pool(m), 1) for m in self.feature_maps(x)]
        return self.neck(torch.cat(branches, dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.features(x)))


class ResNet18Small(nn.Module):
    """torchvision ResNet-18 (random init, never downloaded) adapted to 32-48 px crops.

    The ImageNet stem (7x7 stride-2 conv + max-pool) shrinks 32x32 to 8x8 before the first residual
    block and to 1x1 by the last; the CIFAR-style 3x3 stride-1 stem without max-pool keeps 32x32
    (last stage 4x4), at about 15x the MACs of the ImageNet stem on the same input.
    """

    def __init__(self, num_classes: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        from torchvision.models import resnet18  # lazily: importing torchvision costs ~1 s

        _check_common(num_classes, [64], dropout)
        backbone = resnet18(weights=None)
        backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        backbone.maxpool = nn.Identity()
        self.num_features = backbone.fc.in_features
        backbone.fc = nn.Identity()  # the classifier is our own ``head``; the backbone ends pooled
        self.backbone = backbone
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(self.num_features, num_classes)

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output map of each of the four residual stages, finest first."""
        b = self.backbone
        return stage_maps((b.layer1, b.layer2, b.layer3, b.layer4), b.relu(b.bn1(b.conv1(x))))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.backbone.avgpool(self.feature_maps(x)[-1]), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.features(x)))
