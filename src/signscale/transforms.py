"""Batch preprocessing and augmentation: uint8 NHWC batches in, normalised float32 NCHW out.

Two entry points, both working on whole batches on whatever device the batch is on (CPU inside
DataLoader workers, or the GPU after the transfer):

* :func:`to_input` is *the* preprocessing. Evaluation, prediction and serving call exactly this
  function, and :class:`BatchAugment` with augmentation disabled returns exactly its output, so a
  model never sees a different resize or normalisation at serving time than it saw in training.
* :class:`BatchAugment` is the training augmentation. On 32 px signs the per-sample Python of a
  torchvision pipeline costs far more than the pixel work (it manages under 3,000 images a second
  per core), so every stage here is one batched operation for the whole batch:

  1. brightness, contrast, saturation and the normalisation are all linear in the colour
     channels, so together they are one 3x3 matrix and offset per sample: ONE ``baddbmm``;
  2. geometry -- rotation, zoom, shift, mild perspective and the horizontal flip -- is one 3x3
     matrix per sample and ONE ``grid_sample`` for the batch;
  3. at most one occasional effect per sample (blur, a weather condition, an occluder): the
     samples that drew one are gathered once, grouped by effect, and each group is one batched call;
  4. one clamp to the range that [0, 255] pixels normalise to.

  On CPU at 32 px, ``grid_sample`` takes a third to a half of the time; most of the rest is the
  dispatch cost of the many small per-sample tensors, which is why this code counts its ops. So
  on the CPU, :meth:`BatchAugment.pixels` (what loader workers call) runs all four steps as one
  compiled pass per image instead (:mod:`signscale.kernels`), from the same draws, to the same
  pixels up to float rounding.

Randomness comes only from the caller's ``torch.Generator``: same seed and same input give the
same output on the same device. Draws happen on the generator's device and are moved to the
batch's device, so pass ``torch.Generator(device="cuda")`` when augmenting on the GPU.

Flips follow the label space's flip rules (:meth:`signscale.labels.LabelSpace.flip_map`): a
mirrored ``keep_right`` is relabelled ``keep_left``, a symmetric ``priority_road`` keeps its label,
and a ``speed_limit_30`` is never mirrored, since its mirror image is not a sign at all.

The weather effects re-implement five of :mod:`signscale.corruptions` in torch with the same
severity tables, so training can apply them on the GPU; robustness evaluation keeps using the
numpy originals, which stay the reference definition of each condition (and rain and glare,
which training does not use, remain unseen conditions there).
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import get_worker_info

from signscale import config

try:
    from signscale import kernels
except ImportError:  # no numba (a Python it has no wheels for yet): the torch path does the work
    kernels = None  # type: ignore[assignment]

# Per-channel statistics of GTSRB training crops in [0, 1] (the figures commonly quoted for
# GTSRB): sign crops are darker and flatter than ImageNet photos, whose statistics would leave the
# inputs off-centre. Crops of road signs from other countries are close to these.
GTSRB_MEAN: tuple[float, float, float] = (0.3403, 0.3121, 0.3214)
GTSRB_STD: tuple[float, float, float] = (0.2724, 0.2608, 0.2669)

# Luma weights (ITU-R BT.601), as torchvision's rgb_to_grayscale uses for saturation and contrast.
_LUMA: tuple[float, float, float] = (0.299, 0.587, 0.114)

# Spatial sizes are tuned at 32 px, as in signscale.corruptions, and grow with the image.
_REFERENCE_PX = 32.0

WEATHER_KINDS: tuple[str, ...] = ("fog", "night", "noise", "contrast", "snow")
Padding = Literal["reflection", "border", "zeros"]


# ---------------------------------------------------------------------------------------------
# Configs


@dataclass(frozen=True)
class Preprocess:
    """What every model input goes through: resize to ``size`` and normalise per channel.

    Saved with every checkpoint and model, so a predictor rebuilds exactly the training inputs.
    """

    size: int = 32
    mean: tuple[float, float, float] = GTSRB_MEAN
    std: tuple[float, float, float] = GTSRB_STD

    def __post_init__(self) -> None:
        if self.size < 4:
            raise ValueError(f"size: expected at least 4 pixels, got {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean, std: expected 3 values each (RGB), got {self.mean} and {self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std: every value must be > 0, got {self.std}")

    def to_dict(self) -> dict[str, Any]:
        return config.to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return config.build(cls, d)

    def scale_bias(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """[1, 3, 1, 1] tensors with ``x * scale + bias`` = normalised ``x / 255``: two cheap passes."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        return 1.0 / (255.0 * std), -mean / std


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation for sign crops; each magnitude is the maximum of a per-sample draw.

    Defaults are mild on purpose: a sign crop is already centred and tight, and the model must still
    tell a 30 from an 80, so large rotations, crops or occlusions would destroy the label. There is
    no hue jitter, also on purpose: colour carries meaning (red prohibits, blue mandates). A sample
    gets at most one of blur, weather and erase (stacking them rarely leaves a readable sign).
    """

    enabled: bool = True
    rotate: float = 12.0  # degrees, uniform in [-rotate, rotate]
    scale: tuple[float, float] = (0.9, 1.1)  # zoom factor range (> 1 enlarges the sign)
    translate: float = 0.1  # fraction of the image size, per axis
    perspective: float = 0.06  # projective coefficient in [-1, 1] coordinates: up to ~12% tilt
    flip: float = 0.5  # probability of a horizontal flip, for classes whose flip rule allows one
    # What fills the area a transform exposes: "border" repeats the edge pixels (crops have a margin
    # of background around the sign), "reflection" mirrors it (~20% dearer resampling on CPU),
    # "zeros" fills with the data set's mean colour.
    padding: Padding = "border"
    brightness: float = 0.3  # factor in [1 - b, 1 + b]
    contrast: float = 0.3
    saturation: float = 0.3
    blur: float = 0.1  # probability of a Gaussian blur (defocus, motion); at most one of blur, weather
    #                    and erase per sample, so their probabilities add up to at most 1
    blur_sigma: tuple[float, float] = (0.4, 1.2)  # pixels at 32 px
    weather: float = 0.1  # probability of one weather effect
    weather_kinds: tuple[str, ...] = WEATHER_KINDS
    weather_severity: int = 3  # severities drawn from 1..weather_severity (the corruptions' scale)
    erase: float = 0.15  # probability of an occluding rectangle (sticker, branch, snow patch)
    erase_area: tuple[float, float] = (0.02, 0.1)  # fraction of the image it covers

    def __post_init__(self) -> None:
        for name in ("flip", "blur", "weather", "erase"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: a probability must be in [0, 1], got {getattr(self, name)}")
        for name in ("rotate", "translate", "brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) >= 1:
                raise ValueError(f"{name}: must be < 1 (a factor of 0 or less blanks the image), "
                                 f"got {getattr(self, name)}")
        occasional = self.blur + self.weather + self.erase
        if occasional > 1.0 + 1e-9:
            raise ValueError(f"blur, weather, erase: a sample gets at most one of them, so their "
                             f"probabilities must add up to at most 1, got {occasional:g}")
        if not 0 <= self.perspective < 0.5:
            raise ValueError(f"perspective: must be in [0, 0.5) so the image never folds over, "
                             f"got {self.perspective}")
        _check_range("scale", self.scale, low=0.01)
        _check_range("blur_sigma", self.blur_sigma, low=0.0)
        _check_range("erase_area", self.erase_area, low=0.0, high=1.0)
        if self.padding not in ("reflection", "border", "zeros"):
            raise ValueError(f"padding: expected reflection, border or zeros, got {self.padding!r}")
        unknown = [k for k in self.weather_kinds if k not in WEATHER_KINDS]
        if unknown or (self.weather > 0 and not self.weather_kinds):
            raise ValueError(f"weather_kinds: got {list(self.weather_kinds)}; "
                             f"valid kinds: {', '.join(WEATHER_KINDS)}")
        if not 1 <= self.weather_severity <= 5:
            raise ValueError(f"weather_severity: expected 1..5, got {self.weather_severity}")

    def to_dict(self) -> dict[str, Any]:
        return config.to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AugmentConfig:
        return config.build(cls, d)

    @property
    def geometric(self) -> bool:
        """Whether any geometric op is on; without one the resampling pass is skipped."""
        zoom = tuple(self.scale) != (1, 1)
        return bool(self.rotate or self.translate or self.perspective or self.flip or zoom)

    @property
    def colour(self) -> bool:
        return bool(self.brightness or self.contrast or self.saturation)


def _check_range(name: str, r: tuple[float, float], *, low: float, high: float = math.inf) -> None:
    if len(r) != 2 or not low <= r[0] <= r[1] <= high:
        raise ValueError(f"{name}: expected (min, max) with {low} <= min <= max <= {high}, got {r}")


# ---------------------------------------------------------------------------------------------
# Preprocessing: shared by training, evaluation and serving


def to_input(images_uint8_nhwc: Tensor, pre: Preprocess, *, channels_last: bool = False) -> Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, size, size], resized (antialiased) and normalised."""
    _check_images(images_uint8_nhwc)
    x = _resize(_to_float_nchw(images_uint8_nhwc, channels_last), pre.size)
    scale, bias = pre.scale_bias(x.device)
    return _layout(x.mul_(scale).add_(bias), channels_last)  # in place: x is a fresh tensor


def _check_images(images: Tensor) -> None:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [B, H, W, 3] image batch, "
                         f"got {images.dtype} {tuple(images.shape)}")


def _to_float_nchw(images: Tensor, channels_last: bool) -> Tensor:
    """uint8 NHWC -> a fresh float NCHW tensor in [0, 255].

    The permuted view is already NCHW in channels-last memory order, so converting it keeps that
    layout almost for free. For contiguous NCHW, one copy converts and transposes at once: a single
    allocation matters on CPU, where each fresh buffer costs page faults.
    """
    x = images.permute(0, 3, 1, 2)
    if channels_last:
        return x.float()
    return torch.empty(x.shape, dtype=torch.float32, device=x.device).copy_(x)


def _resize(x: Tensor, size: int) -> Tensor:
    """Antialiased bilinear resize: downscaling without aliasing, and no overshoot beyond [0, 255]."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _layout(x: Tensor, channels_last: bool) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# Augmentation


# Columns of the per-sample draws. One [B, _NCOLS] uniform draw per batch means a sample's
# parameters do not depend on which effects the other samples drew; one multiply-add then maps
# every column to its natural unit (radians, zoom factor, pixels, ...), see _param_ranges.
_ROT, _SCALE, _TX, _TY, _PX, _PY, _FLIP, _BRIGHT, _CONTRAST, _SAT = range(10)
_EFFECT, _BLUR_SIGMA, _SEVERITY, _WEATHER_VALUE = range(10, 14)
_ERASE_AREA, _ERASE_ASPECT, _ERASE_Y, _ERASE_X, _ERASE_R, _ERASE_G, _ERASE_B = range(14, 21)
_NCOLS = 21


class BatchAugment:
    """Random geometry, colour and weather for a whole batch at once; see the module docstring.

    A plain picklable object with no parameters, so each DataLoader worker can hold its own copy.
    It caches small constant tensors per device and, per thread, the large intermediate buffers
    (the float input, the colour output, the sampling grid, the gathered subset): on CPU every
    fresh multi-megabyte buffer costs page faults, which on a virtual machine took longer than
    the arithmetic (2,000 faults, about 4 ms, per batch of 256 at 32 px before this).
    """

    def __init__(self, cfg: AugmentConfig, pre: Preprocess, flip_map: Tensor | np.ndarray, *,
                 channels_last: bool = False, compiled: bool | None = None) -> None:
        """``compiled``: whether :meth:`pixels` may use the numba kernel on CPU batches (None: where
        numba imports; False: always the torch ops, which the kernel is tested against)."""
        self.cfg = cfg
        self.pre = pre
        self.channels_last = channels_last
        if compiled and kernels is None:
            raise ValueError("compiled=True: the compiled kernels need numba (pip install numba)")
        self.compiled = kernels is not None if compiled is None else compiled
        fm = torch.as_tensor(np.asarray(flip_map), dtype=torch.int64).reshape(-1)
        if fm.numel() and (fm.min() < -1 or fm.max() >= fm.numel()):
            raise ValueError(f"flip_map: entries must be -1 (never flip) or a class id < {fm.numel()}")
        self.flip_map = fm
        self._init_caches()

    def _init_caches(self) -> None:
        self._consts: dict[tuple[torch.device, Preprocess], _Constants] = {}
        self._setups: dict[tuple[int, int, tuple[float, ...]], Any] = {}  # the kernel's, per image size
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_consts", "_setups", "_local")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_caches()

    def __call__(self, images_uint8_nhwc: Tensor, labels: Tensor, generator: torch.Generator | None = None
                 ) -> tuple[Tensor, Tensor]:
        """(uint8 [B, H, W, 3], int64 [B]) -> (normalised float32 [B, 3, size, size], labels after flips).

        Colour comes before geometry: both colour and normalisation are affine per pixel and bilinear
        weights sum to one, so the order does not change the result, and this way grid_sample's
        output is the batch returned, with no further full-size buffer. (The area a transform
        exposes is therefore padded in normalised space: ``zeros`` shows the data set's mean colour.)
        """
        _check_images(images_uint8_nhwc)
        self._check_labels(labels, images_uint8_nhwc.shape[0])
        if not self.cfg.enabled or images_uint8_nhwc.shape[0] == 0:
            return to_input(images_uint8_nhwc, self.pre, channels_last=self.channels_last), labels
        k = self._constants(images_uint8_nhwc.device, self.pre)
        x, new_labels = self._augment(images_uint8_nhwc, labels, generator, k)
        torch.minimum(torch.maximum(x, k.lo, out=x), k.hi, out=x)  # (clamp with tensor bounds is slower)
        return _layout(x, self.channels_last), new_labels

    def pixels(self, images_uint8_nhwc: Tensor, labels: Tensor, generator: torch.Generator | None = None, *,
               shared: bool = False) -> tuple[Tensor, Tensor]:
        """The same augmentation, rounded to 8-bit pixels: (uint8 [B, size, size, 3], labels after flips).

        What a DataLoader worker should hand over: a quarter of the float batch's bytes through
        shared memory (on CPU, faulting in fresh shared pages cost a worker more than the bilinear
        resampling) and over PCIe, and :func:`to_input` on the receiving side makes the model input,
        exactly as for evaluation. The values equal ``__call__``'s up to the rounding (at most half
        a grey level, 0.5 / (255 std) after normalisation). The batch is NHWC in shape and
        channel-planar in memory (a permuted view), which :func:`to_input` reads without a transpose.
        ``shared`` puts a new batch in shared memory, so that a worker's queue passes it on without
        copying it there (a copy into freshly faulted pages).
        """
        _check_images(images_uint8_nhwc)
        self._check_labels(labels, images_uint8_nhwc.shape[0])
        size = self.pre.size
        if not self.cfg.enabled or images_uint8_nhwc.shape[0] == 0:
            if images_uint8_nhwc.shape[1:3] == (size, size):
                return images_uint8_nhwc, labels
            x = _resize(_to_float_nchw(images_uint8_nhwc, channels_last=False), size)
            return _rounded_pixels(x.add_(0.5).clamp_(0.5, 255.5), shared), labels
        # "Normalised" here means pixel + 0.5 (std 1/255): every step below keeps its meaning, the
        # clamp's bounds become 0.5 and 255.5, and truncation is then rounding. With zeros padding
        # the exposed area must show the data set's mean colour, as in __call__, so that space is
        # centred on the mean and shifted back after the clamp.
        centred = self.cfg.padding == "zeros"
        half = (-0.5 / 255,) * 3
        k = self._constants(images_uint8_nhwc.device, _pixel_space(size, self.pre.mean if centred else half))
        if self._use_kernel(images_uint8_nhwc):
            return self._kernel_pixels(images_uint8_nhwc, labels, generator, k, shared)
        x, new_labels = self._augment(images_uint8_nhwc, labels, generator, k)
        return _rounded_pixels(self._pixel_clamp(x, k), shared), new_labels

    def _pixel_clamp(self, x: Tensor, k: _Constants) -> Tensor:
        """In place: :meth:`pixels`' values (pixel + 0.5, or centred on the mean for zeros padding)
        clamped to [0.5, 255.5] in pixel + 0.5 units, ready to truncate."""
        if self.cfg.padding == "zeros":  # pixel - 255 * mean: clamp, then back to pixel + 0.5
            return torch.minimum(torch.maximum(x, k.lo, out=x), k.hi, out=x).sub_(k.bias - 0.5)
        return x.clamp_(0.5, 255.5)

    def _use_kernel(self, images: Tensor) -> bool:
        """The compiled kernel covers the usual case: CPU, images already at the model's size, and
        some geometry (without it there is no resampling to fuse)."""
        return (self.compiled and images.device.type == "cpu" and self.cfg.geometric
                and images.shape[1:3] == (self.pre.size, self.pre.size))

    def _kernel_pixels(self, images: Tensor, labels: Tensor, generator: torch.Generator | None,
                       k: _Constants, shared: bool) -> tuple[Tensor, Tensor]:
        """:meth:`pixels` with colour, geometry, the occasional effect, clamp and rounding in one
        compiled pass per image (:func:`signscale.kernels.augment`).

        The draws are the torch path's own, from the same generator in the same order (the
        per-sample draws, then each weather kind's random numbers), and the kernel derives the
        matrices from them as the torch path does: both give the same pixels up to float rounding.
        """
        cfg, (n, h, w, _) = self.cfg, images.shape
        p = _uniform((n, _NCOLS), generator, images.device).mul_(k.span).add_(k.low)
        flip = (p[:, _FLIP] < cfg.flip) & (k.flip_map[labels] >= 0)
        q = p.numpy()
        # 0 blur, 1.. each weather kind, then erase, then none: as _occasional draws them
        drawn = np.searchsorted(k.effect_bounds.numpy(), q[:, _EFFECT], side="right")
        draws, at = _kernel_weather(drawn, cfg, generator, (h, w))
        out = _planar_uint8((n, 3, h, w), images.device, shared)
        kernels.augment(images.numpy(), out.numpy(), self._kernel_setup(k, h, w), q, flip.numpy(),
                        _kernel_codes(cfg.weather_kinds)[drawn], draws, at)
        return out.permute(0, 2, 3, 1), torch.where(flip, k.flip_map[labels], labels)

    def _kernel_setup(self, k: _Constants, h: int, w: int) -> Any:
        key = (h, w, tuple(k.bias.flatten().tolist()))
        setup = self._setups.get(key)
        if setup is None:
            setup = self._setups[key] = _kernel_setup(self.cfg, k, h, w)
        return setup

    def _augment(self, images_uint8_nhwc: Tensor, labels: Tensor, generator: torch.Generator | None,
                 k: _Constants) -> tuple[Tensor, Tensor]:
        """Colour, geometry and the occasional effects in the value space of ``k``, before the clamp."""
        cfg, device = self.cfg, images_uint8_nhwc.device
        p = _uniform((images_uint8_nhwc.shape[0], _NCOLS), generator, device).mul_(k.span).add_(k.low)
        flip = (p[:, _FLIP] < cfg.flip) & (k.flip_map[labels.to(device)] >= 0)
        # Without geometry the colour step's output is the result, so it must be a fresh tensor.
        x = self._normalised(images_uint8_nhwc, p, k, into_scratch=cfg.geometric)
        if cfg.geometric:
            m = _sampling_matrices(p, flip, x.shape[-2], x.shape[-1], projective=cfg.perspective > 0)
            grid = self._scratch("grid", (x.shape[0], 2, x.shape[-2], x.shape[-1]), device)
            x = _warp(x, m, cfg.padding, projective=cfg.perspective > 0, grid=grid)
        x = self._occasional(x, p, k, generator)
        flip_map = k.flip_map if labels.device == device else self.flip_map.to(labels.device)
        return x, torch.where(flip.to(labels.device), flip_map[labels], labels)

    def _normalised(self, images: Tensor, p: Tensor, k: _Constants, *, into_scratch: bool) -> Tensor:
        """uint8 NHWC -> resized, colour-jittered, normalised float NCHW."""
        n, h, w, _ = images.shape
        size = self.pre.size
        resized = (h, w) != (size, size)
        if into_scratch and not resized:
            x = self._scratch("input", (n, 3, h, w), images.device).copy_(images.permute(0, 3, 1, 2))
        else:
            x = _resize(_to_float_nchw(images, channels_last=False), size)
        if not self.cfg.colour:
            return x.mul_(k.scale).add_(k.bias)
        out = self._scratch("colour", x.shape, x.device) if into_scratch else torch.empty_like(x)
        return self._colour(x, p, k, out)

    def _scratch(self, name: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """This thread's reusable float buffer ``name``, viewed as ``shape`` (grown when too small)."""
        store: dict[tuple[str, torch.device], Tensor] = self._local.__dict__.setdefault("buffers", {})
        buf = store.get((name, device))
        if buf is None or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0]:
            buf = store[(name, device)] = torch.empty(shape, dtype=torch.float32, device=device)
        return buf[: shape[0]]

    def _check_labels(self, labels: Tensor, n: int) -> None:
        if labels.ndim != 1 or labels.shape[0] != n:
            raise ValueError(f"labels: expected shape [{n}] to match the images, got {tuple(labels.shape)}")
        if labels.numel():
            lo, hi = (int(v) for v in torch.aminmax(labels))
            if lo < 0 or hi >= self.flip_map.numel():
                raise ValueError(f"labels: class ids must be in 0..{self.flip_map.numel() - 1} (the flip "
                                 f"map's label space), got {lo}..{hi}")

    def _constants(self, device: torch.device, pre: Preprocess) -> _Constants:
        c = self._consts.get((device, pre))
        if c is None:
            c = self._consts[(device, pre)] = _Constants.build(self.cfg, pre, self.flip_map, device)
        return c

    def _colour(self, x: Tensor, p: Tensor, k: _Constants, out: Tensor) -> Tensor:
        """[0, 255] -> normalised into ``out``, with brightness, contrast and saturation in the same pass
        (one 3x3 matrix and offset per sample, see :func:`_colour_matrices`)."""
        n = x.shape[0]
        mean_luma = x.mean(dim=(2, 3)) @ k.luma  # [B], in [0, 255], of the whole unwarped crop
        matrix, shift = _colour_matrices(p, k)
        matrix = matrix * k.scale3  # rows scaled by 1 / (255 std)
        offset = (shift * mean_luma)[:, None] * k.scale3.view(1, 3) + k.bias3  # [B, 3]
        flat = x.reshape(n, 3, -1)
        offset = offset[:, :, None].expand_as(flat)  # (an explicitly expanded offset is baddbmm's fast path)
        return torch.baddbmm(offset, matrix, flat, out=out.view_as(flat)).view_as(x)

    def _occasional(self, x: Tensor, p: Tensor, k: _Constants, g: torch.Generator | None) -> Tensor:
        """Blur, weather or occlusion, in place, on just the samples that drew one.

        Each sample gets at most one of them. The chosen samples are gathered once, sorted by
        effect, so every effect (and every weather kind) works on a contiguous slice with one
        batched call, and scattered back once. Blur and occlusion work on normalised values (a
        blur whose weights sum to one commutes with the normalisation); weather is defined on
        [0, 1] pixels, so its slice is un-normalised and re-normalised around it.
        """
        cfg = self.cfg
        if not (cfg.blur or cfg.weather or cfg.erase):
            return x
        # 0 blur, 1.. each weather kind, then erase, then none: one categorical draw per sample
        code = (p[:, _EFFECT, None] >= k.effect_bounds).sum(1)
        counts = torch.bincount(code, minlength=len(k.effect_bounds) + 1).tolist()
        chosen = len(code) - counts.pop()
        if not chosen:
            return x
        idx = torch.sort(code, stable=True).indices[:chosen]  # grouped by effect
        xs = torch.index_select(x, 0, idx, out=self._scratch("subset", (chosen, *x.shape[1:]), x.device))
        ps = p.index_select(0, idx)
        scale = min(x.shape[-2:]) / _REFERENCE_PX
        blur, weather, erase = _slices(counts[0], sum(counts[1:-1]), counts[-1])
        if counts[0]:
            rows, cols = (_blur_bank(n, cfg.blur_sigma, scale, x.device) for n in x.shape[-2:])
            level = ps[blur, _BLUR_SIGMA].long()
            xs[blur] = _separable(xs[blur], rows[level], cols[level])
        if weather.stop > weather.start:
            pixels = xs[weather].mul_(k.std).add_(k.mean).clamp_(0.0, 1.0)
            _weather(pixels, ps[weather], counts[1:-1], cfg, g, scale)
            pixels.mul_(k.unit_scale).add_(k.unit_bias)
        if counts[-1]:
            _erase(xs[erase], ps[erase], (k.mean, k.std))
        x.index_copy_(0, idx, xs)
        return x


def _colour_matrices(p: Tensor, k: _Constants) -> tuple[Tensor, Tensor]:
    """Per sample, the [3, 3] matrix and the multiple of the image's mean luma that brightness,
    contrast and saturation add up to, in pixel units.

    Brightness b, then contrast c (towards the image's mean luma m), then saturation s (towards
    each pixel's luma g) compose to ``y = s*c*b*x + (1-s)*c*b*g + (1-c)*b*m``, which is linear in
    the channels: ``matrix @ x + shift * m``. Unlike torchvision the order is fixed and there is
    no clamp between the steps; both only matter at factors far beyond these defaults.
    """
    b, c, s = p[:, _BRIGHT, None, None], p[:, _CONTRAST, None, None], p[:, _SAT, None, None]
    cb = c * b
    return s * cb * k.eye + (1 - s) * cb * k.luma_rows, (b - cb)[:, 0, 0]


@functools.lru_cache(maxsize=8)
def _kernel_codes(weather_kinds: tuple[str, ...]) -> np.ndarray:
    """The kernel's effect code for each categorical draw: blur, each weather kind, erase, none."""
    weather = [kernels.WEATHER[name] for name in weather_kinds]
    return np.array([kernels.BLUR, *weather, kernels.ERASE, kernels.PLAIN], dtype=np.int32)


def _kernel_setup(cfg: AugmentConfig, k: _Constants, h: int, w: int) -> Any:
    """The kernel's per-config inputs (:class:`signscale.kernels.Setup`), with this module's tables."""
    scale = min(h, w) / _REFERENCE_PX
    columns = {"rotate": _ROT, "zoom": _SCALE, "shift_x": _TX, "shift_y": _TY, "tilt_x": _PX, "tilt_y": _PY,
               "brightness": _BRIGHT, "contrast": _CONTRAST, "saturation": _SAT, "blur_level": _BLUR_SIGMA,
               "severity": _SEVERITY, "fog_grey": _WEATHER_VALUE, "erase_area": _ERASE_AREA,
               "erase_log_aspect": _ERASE_ASPECT, "erase_y": _ERASE_Y, "erase_x": _ERASE_X, "erase_r": _ERASE_R,
               "erase_g": _ERASE_R + 1, "erase_b": _ERASE_B}
    weather = np.zeros((len(kernels.WEATHER), 5, 5), np.float32)
    for name, code in kernels.WEATHER.items():
        values = np.asarray(_WEATHER_EFFECTS[name][1].values, np.float32)
        weather[code - min(kernels.WEATHER.values()), :, :values.shape[1]] = values
    cpu = torch.device("cpu")
    return kernels.Setup(
        columns=np.array([columns[name] for name in kernels.PARAMETERS], np.int64), projective=cfg.perspective > 0,
        padding=cfg.padding, luma=k.luma.numpy(), fill=(-k.bias).reshape(3).numpy(),
        blur_taps=_blur_taps(cfg.blur_sigma, scale, min(h, w)), weather=weather, max_severity=cfg.weather_severity,
        fog_rows=_fog_rows(h, cpu).numpy(), fog_cols=_upsampler(w, 4, cpu).numpy(),
        snow_sizes=np.array([max(1, round(scale)), max(1, round(2 * scale))], dtype=np.int64),
        soften=_soften_taps(scale, min(h, w)))


@functools.lru_cache(maxsize=8)
def _pixel_space(size: int, mean: tuple[float, float, float]) -> Preprocess:
    """A "normalisation" to pixel value - 255 * mean, so BatchAugment's steps work in pixel units."""
    return Preprocess(size=size, mean=mean, std=(1 / 255,) * 3)


def _rounded_pixels(x: Tensor, shared: bool = False) -> Tensor:
    """float NCHW in [0.5, 255.5] -> uint8 with NHWC shape over NCHW memory, truncated (so rounded).

    Written channel-planar because the float batch is: an interleaving copy costs three times as much.
    """
    return _planar_uint8(x.shape, x.device, shared).copy_(x).permute(0, 2, 3, 1)


def _planar_uint8(shape: tuple[int, ...], device: torch.device, shared: bool) -> Tensor:
    out = torch.empty(shape, dtype=torch.uint8, device=device)
    return out.share_memory_() if shared and device.type == "cpu" else out


class LoaderAugment:
    """The loader's batch transform: :meth:`BatchAugment.pixels` on each whole batch in a worker.

    Seeded by the batch's own seed, so the pixels do not depend on which worker made them. The
    batch keeps uint8 images (a quarter of the bytes to pass between processes and to the GPU) and
    gains ``augmented``, which tells the training loop to only normalise them with :func:`to_input`.
    """

    def __init__(self, augment: BatchAugment) -> None:
        self.augment = augment
        if augment.compiled:
                kernels.warm(augment.pre.size)  # here, in the process that forks the workers

    def __call__(self, b: dict[str, Any]) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(b["seed"])
        in_worker = get_worker_info() is not None
        b["image"], b["meta"][:, 1] = self.augment.pixels(b["image"], b["meta"][:, 1], gen, shared=in_worker)
        b["augmented"] = True
        return b


def _slices(*counts: int) -> list[slice]:
    """Consecutive slices of the given lengths."""
    out, start = [], 0
    for c in counts:
        out.append(slice(start, start + c))
        start += c
    return out


@dataclass(frozen=True)
class _Constants:
    """Small tensors :class:`BatchAugment` needs on one device, made once."""

    flip_map: Tensor
    luma: Tensor  # [3]
    luma_rows: Tensor  # [3, 3], every row the luma weights
    eye: Tensor
    mean: Tensor  # [1, 3, 1, 1], in [0, 1] units
    std: Tensor
    scale: Tensor  # [1, 3, 1, 1]: [0, 255] -> normalised is x * scale + bias
    bias: Tensor
    scale3: Tensor  # [3, 1]
    bias3: Tensor  # [1, 3]
    unit_scale: Tensor  # [1, 3, 1, 1]: [0, 1] -> normalised is x * unit_scale + unit_bias
    unit_bias: Tensor
    lo: Tensor  # [1, 3, 1, 1]: what pixel value 0 normalises to
    hi: Tensor  # and 255
    low: Tensor  # [_NCOLS]: parameters = uniform draws * span + low
    span: Tensor
    effect_bounds: Tensor  # cumulative probabilities of blur, each weather kind, erase

    @classmethod
    def build(cls, cfg: AugmentConfig, pre: Preprocess, flip_map: Tensor, device: torch.device) -> _Constants:
        def t(v: Any) -> Tensor:
            return torch.as_tensor(v, dtype=torch.float32).to(device)

        luma = t(_LUMA)
        scale, bias = pre.scale_bias(device)
        return cls(flip_map=flip_map.to(device), luma=luma, luma_rows=luma.expand(3, 3).contiguous(),
                   eye=torch.eye(3, device=device), mean=t(pre.mean).view(1, 3, 1, 1),
                   std=t(pre.std).view(1, 3, 1, 1),
                   scale=scale, bias=bias, scale3=scale.view(3, 1), bias3=bias.view(1, 3),
                   unit_scale=scale * 255.0, unit_bias=bias,
                   **_pixel_bounds(scale, bias), **_param_ranges(cfg, pre.size, device),
                   effect_bounds=_effect_bounds(cfg, device))


def _effect_bounds(cfg: AugmentConfig, device: torch.device) -> Tensor:
    """Cumulative probabilities of blur, of each weather kind (weather shared evenly) and of erase."""
    kinds = len(cfg.weather_kinds)
    probs = [cfg.blur] + [cfg.weather / max(kinds, 1)] * kinds + [cfg.erase]
    return torch.tensor(np.cumsum(probs), dtype=torch.float32, device=device)


def _param_ranges(cfg: AugmentConfig, size: int, device: torch.device) -> dict[str, Tensor]:
    """``low`` and ``span`` per draw column, so that ``u * span + low`` is each parameter in its unit."""
    ranges = [(0.0, 1.0)] * _NCOLS  # probabilities and colours stay U[0, 1)
    rotate = math.radians(cfg.rotate)
    ranges[_ROT] = (-rotate, 2 * rotate)  # radians
    ranges[_SCALE] = (cfg.scale[0], cfg.scale[1] - cfg.scale[0])  # zoom factor
    ranges[_TX] = ranges[_TY] = (-2 * cfg.translate, 4 * cfg.translate)  # [-1, 1] spans the image
    ranges[_PX] = ranges[_PY] = (-cfg.perspective, 2 * cfg.perspective)
    for col, amount in ((_BRIGHT, cfg.brightness), (_CONTRAST, cfg.contrast), (_SAT, cfg.saturation)):
        ranges[col] = (1 - amount, 2 * amount)  # factor
    ranges[_BLUR_SIGMA] = (0.0, _BLUR_LEVELS - 1e-3)  # floor: which of the blur bank's sigmas
    ranges[_SEVERITY] = (0.0, float(cfg.weather_severity))  # floor: severity - 1
    ranges[_WEATHER_VALUE] = (0.68, 0.14)  # fog's grey, as corruptions.fog
    ranges[_ERASE_AREA] = (cfg.erase_area[0], cfg.erase_area[1] - cfg.erase_area[0])  # fraction of the image
    ranges[_ERASE_ASPECT] = (math.log(0.5), math.log(4.0))  # log of height / width, in [1/2, 2]
    ranges[_ERASE_Y] = ranges[_ERASE_X] = (0.0, float(size))  # centre, pixels
    low, span = torch.tensor(ranges, dtype=torch.float32, device=device).unbind(1)
    return {"low": low, "span": span}


def _pixel_bounds(scale: Tensor, bias: Tensor) -> dict[str, Tensor]:
    """Per channel, what pixels 0 and 255 normalise to, computed in float32 exactly as the data is.

    (Bounds computed in double can sit one rounding step inside the float32 value of a black or
    white pixel, and the clamp would then nudge pixels that augmentation never touched.)
    """
    return {"lo": 0.0 * scale + bias, "hi": 255.0 * scale + bias}


def _uniform(shape: tuple[int, ...], g: torch.Generator | None, device: torch.device) -> Tensor:
    """U[0, 1) drawn on the generator's device (so a seed means the same numbers) then moved."""
    where = g.device if g is not None else device
    return torch.rand(shape, generator=g, device=where).to(device)


def _normal(shape: tuple[int, ...], g: torch.Generator | None, device: torch.device) -> Tensor:
    where = g.device if g is not None else device
    return torch.randn(shape, generator=g, device=where).to(device)


# ---------------------------------------------------------------------------------------------
# Geometry: one 3x3 matrix per sample, one grid_sample per batch


def _sampling_matrices(p: Tensor, flip: Tensor, h: int, w: int, *, projective: bool) -> Tensor:
    """[B, 3, 3] maps from output to input coordinates in grid_sample's [-1, 1] space.

    The forward transform (what happens to the sign) is flip, zoom, rotate, shift, then tilt; the
    sampler needs its inverse, so a zoom of 1.1 really enlarges the sign by 10%, and a flip is
    exactly ``x -> -x``, which keeps a flipped image pixel-exact. Rotation happens in pixel units,
    so non-square images rotate without shearing.
    """
    n = p.shape[0]
    angle, zoom, shift = p[:, _ROT], p[:, _SCALE], p[:, _TX:_TY + 1]
    mirror = 1.0 - 2.0 * flip.to(p.dtype)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # mirror @ (1 / zoom) @ rotation(-angle): the inverse of the linear part
    a = torch.stack([mirror * cos, mirror * sin * (h / w), -sin * (w / h), cos], dim=1).view(n, 2, 2)
    b = -(a @ shift[:, :, None])  # undo the shift before the linear part: [B, 2, 1]
    last = torch.zeros(n, 1, 3, dtype=p.dtype, device=p.device)
    last[:, 0, 2] = 1.0
    if projective:
        # the inverse of a tilt [[1, 0, 0], [0, 1, 0], [p, q, 1]] negates p and q; fold it in on the right
        tilt = p[:, _PX:_PY + 1]
        a = a - b * tilt[:, None, :]
        last[:, 0, :2] = -tilt
    return torch.cat([torch.cat([a, b], dim=2), last], dim=1)


@functools.lru_cache(maxsize=32)
def _pixel_centres(size: int, device: torch.device) -> Tensor:
    """Pixel centres in [-1, 1] (align_corners=False), written so that -c[i] == c[size-1-i] exactly."""
    return (torch.arange(size, device=device, dtype=torch.float32) * 2 + (1 - size)) / size


def _warp(x: Tensor, m: Tensor, padding: str, *, projective: bool, grid: Tensor | None = None) -> Tensor:
    """Resample every image through its matrix with one grid_sample.

    The grid is separable -- ``grid[b, :, i, j] = U[b, :, j] + V[b, :, i]`` -- so it is one
    broadcast add into planar [B, 2, H, W] form, many times cheaper than ``affine_grid``'s batched
    matmul (which at 32 px costs more than the sampling itself); grid_sample then reads the planar
    grid through a permuted view, so it is never interleaved in memory.
    """
    h, w = x.shape[-2:]
    xs, ys = _pixel_centres(w, x.device), _pixel_centres(h, x.device)
    along_x = m[:, :, 0, None] * xs + m[:, :, 2, None]  # [B, 3, W]: homogeneous (x, y, depth) terms
    along_y = m[:, :, 1, None] * ys  # [B, 3, H]
    grid = torch.add(along_x[:, :2, None, :], along_y[:, :2, :, None], out=grid)  # [B, 2, H, W]
    if projective:
        depth = along_x[:, 2:, None, :] + along_y[:, 2:, :, None]  # >= 1 - 2 * perspective > 0
        grid = grid.div_(depth)
    grid = grid.permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


# ---------------------------------------------------------------------------------------------
# Occasional effects: each takes the [k, C, H, W] subset that drew it and its rows of draws


def _separable(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Filter each [k, C, H, W] image by its [k, H, H] matrix along columns and [k, W, W] along rows.

    With banded blur matrices that have the border reflection folded in, this is a separable blur
    as two batched matrix products, which on small images beats grouped convolutions several times.
    """
    n, c, h, w = x.shape
    y = torch.bmm(x.reshape(n, c * h, w), cols.transpose(1, 2)).view(n * c, h, w)  # along each row
    return torch.bmm(rows.repeat_interleave(c, 0), y).view(n, c, h, w)  # along each column


# Blur strengths are drawn from a bank of this many sigmas, evenly spaced over blur_sigma: the
# matrices are then built once, not per sample and batch.
_BLUR_LEVELS = 8


@functools.lru_cache(maxsize=32)
def _blur_bank(n: int, sigma: tuple[float, float], scale: float, device: torch.device) -> Tensor:
    """[_BLUR_LEVELS, n, n] blur matrices for sigmas evenly spaced over ``sigma`` (pixels at 32 px)."""
    sigmas, radius = _blur_levels(sigma, scale, device)
    return _blur_matrix(sigmas, n, radius)


def _blur_levels(sigma: tuple[float, float], scale: float, device: torch.device) -> tuple[Tensor, int]:
    """The bank's sigmas at this image size and the radius that covers the largest."""
    sigmas = torch.linspace(sigma[0] * scale, sigma[1] * scale, _BLUR_LEVELS, device=device)
    return sigmas, max(1, math.ceil(2.5 * sigma[1] * scale))


def _blur_matrix(sigma: Tensor, n: int, radius: int) -> Tensor:
    """[k, n, n] with ``(G @ v)[i] = sum_t w(t) v[reflect(i + t)]`` over |t| <= radius, w per sample."""
    radius = min(radius, n - 1)  # reflection reaches one image-width out at most
    taps = torch.arange(-radius, radius + 1, device=sigma.device)
    weights = _blur_weights(sigma, radius)  # [k, T]
    src = torch.arange(n, device=sigma.device)[:, None] + taps  # [n, T]
    src = torch.where(src < 0, -src, torch.where(src > n - 1, 2 * (n - 1) - src, src))
    k = sigma.shape[0]
    g = torch.zeros(k, n, n, dtype=weights.dtype, device=sigma.device)
    return g.scatter_add_(2, src.expand(k, n, -1), weights[:, None, :].expand(k, n, -1))


def _blur_weights(sigma: Tensor, radius: int) -> Tensor:
    """[k, 2 radius + 1] normalised Gaussian taps, one row per sigma."""
    taps = torch.arange(-radius, radius + 1, device=sigma.device)
    weights = torch.exp(-0.5 * (taps / sigma.clamp(min=1e-3)[:, None]) ** 2)
    return weights / weights.sum(1, keepdim=True)


@functools.lru_cache(maxsize=32)
def _blur_taps(sigma: tuple[float, float], scale: float, n: int) -> np.ndarray:
    """The blur bank of :func:`_blur_bank` as taps, float32 [_BLUR_LEVELS, 2 radius + 1], for the kernel."""
    sigmas, radius = _blur_levels(sigma, scale, torch.device("cpu"))
    return _blur_weights(sigmas, min(radius, n - 1)).numpy()


def _weather(x: Tensor, p: Tensor, counts: list[int], cfg: AugmentConfig, g: torch.Generator | None,
             scale: float) -> None:
    """In place: one weather condition per sample, of the kind and severity it drew, on [0, 1] pixels.

    The rows come sorted by kind (``counts`` of each, in ``cfg.weather_kinds`` order), so each kind
    works on a contiguous slice: the costly parts (per-pixel random numbers, ``pow``) are paid only
    by the samples that need them.
    """
    level = p[:, _SEVERITY].long().clamp_(max=cfg.weather_severity - 1)  # severity - 1
    for name, rows in zip(cfg.weather_kinds, _slices(*counts), strict=True):
        if rows.stop > rows.start:
            effect, table = _WEATHER_EFFECTS[name]
            draw = _weather_draw(name, rows.stop - rows.start, tuple(x.shape[-2:]), g, x.device)
            effect(x[rows], table[x.device][level[rows]], p[rows, _WEATHER_VALUE], draw, scale)


class _PerDevice(dict):
    """A table of per-severity parameters, copied to each device on first use: ``table[device]``.

    Shaped [severities, parameters, 1, 1], so that ``table[device][level][:, i:i + 1]`` broadcasts
    over a [k, C, H, W] batch with one indexing op (at 32 px the op count, not the arithmetic,
    is what these small subsets cost).
    """

    def __init__(self, values: list[list[float]]) -> None:
        super().__init__()
        self.values = values

    def __missing__(self, device: torch.device) -> Tensor:
        t = self[device] = torch.tensor(self.values, dtype=torch.float32, device=device)[:, :, None, None]
        return t


def _towards_(x: Tensor, target: Tensor | float, amount: Tensor) -> Tensor:
    """In place ``x += amount * (target - x)``: what ``torch.lerp`` computes, but lerp and addcmul are
    several times slower than plain arithmetic when an operand broadcasts (per sample or channel)."""
    return x.add_((target - x).mul_(amount))


# Each effect changes its rows of the subset in place, given their rows of its table (one row per
# severity 1..5, with the values of signscale.corruptions), their U[0, 1) value, their random
# numbers (drawn by _weather_draw; None for an effect that draws none) and the image size relative
# to 32 px.
Weather = Callable[[Tensor, Tensor, Tensor, Tensor | None, float], None]

_FOG_PARAMS = _PerDevice([[a] for a in (0.25, 0.35, 0.45, 0.55, 0.65)])  # thickness


def _fog(x: Tensor, t: Tensor, value: Tensor, draw: Tensor | None, scale: float) -> None:
    """Blend towards light grey, thicker towards the top and in uneven patches (corruptions.fog)."""
    n, _, h, w = x.shape
    assert draw is not None
    coarse = draw.mul_(0.5).add_(0.75)  # U[0, 1) [n, 1, 4, 4] -> patches in [0.75, 1.25]
    # bilinear upsampling of the 4x4 grid (whose rows sum to one), with the top-to-bottom thinning
    alpha = torch.matmul(torch.matmul(_fog_rows(h, x.device), coarse), _upsampler(w, 4, x.device).T)
    _towards_(x, value.view(n, 1, 1, 1), alpha.mul_(t).clamp_(0.0, 0.92))


@functools.lru_cache(maxsize=32)
def _upsampler(n: int, cells: int, device: torch.device) -> Tensor:
    """[n, cells] bilinear weights, as ``F.interpolate(align_corners=True)`` and corruptions._smooth_field.

    Two tiny matrix products upsample a batch of coarse grids several times faster than interpolate.
    """
    pos = torch.linspace(0, cells - 1, n, device=device)
    lo = pos.long().clamp_(max=cells - 2)
    frac = pos - lo
    m = torch.zeros(n, cells, device=device)
    m[torch.arange(n, device=device), lo] = 1 - frac
    m[torch.arange(n, device=device), lo + 1] = frac
    return m


@functools.lru_cache(maxsize=32)
def _fog_rows(n: int, device: torch.device) -> Tensor:
    """The row upsampler scaled by corruptions.fog's vertical profile (1.15 at the top to 0.85)."""
    return torch.linspace(1.15, 0.85, n, device=device)[:, None] * _upsampler(n, 4, device)


# gamma, noise sigma, gain * (r, g, b) tint
_NIGHT_PARAMS = _PerDevice([[1.3 + 0.3 * s, 0.008 + 0.008 * s] + [(0.95 - 0.11 * s) * c for c in (
    1 - 0.04 * s, 1 - 0.02 * s, 1 + 0.03 * s)] for s in range(1, 6)])


def _night(x: Tensor, t: Tensor, value: Tensor, draw: Tensor | None, scale: float) -> None:
    """Gamma darkening with a blue cast and sensor noise, as with a dashcam after dusk (corruptions.night)."""
    assert draw is not None
    x.pow_(t[:, :1]).mul_(t[:, 2:]).add_(draw.mul_(t[:, 1:2]))


_NOISE_PARAMS = _PerDevice([[s] for s in (0.03, 0.05, 0.08, 0.11, 0.15)])  # sigma


def _noise(x: Tensor, t: Tensor, value: Tensor, draw: Tensor | None, scale: float) -> None:
    """Additive Gaussian sensor noise (corruptions.noise)."""
    assert draw is not None
    x.add_(draw.mul_(t))


_CONTRAST_PARAMS = _PerDevice([[1 - k] for k in (0.75, 0.6, 0.45, 0.32, 0.22)])  # 1 - the contrast kept


def _contrast(x: Tensor, t: Tensor, value: Tensor, draw: Tensor | None, scale: float) -> None:
    """Pull every pixel towards the image mean: haze, cheap sensor, overcast (corruptions.contrast)."""
    _towards_(x, x.mean(dim=(1, 2, 3), keepdim=True), t)


# whitening, flake density, larger flakes
_SNOW_PARAMS = _PerDevice([[whiten, density, float(s >= 3)] for s, whiten, density in zip(
    range(1, 6), (0.12, 0.2, 0.28, 0.36, 0.45), (0.012, 0.02, 0.03, 0.04, 0.055), strict=True)])


def _snow(x: Tensor, t: Tensor, value: Tensor, draw: Tensor | None, scale: float) -> None:
    """Whitened, low-contrast scene with white flakes that grow with severity (corruptions.snow)."""
    h, w = x.shape[-2:]
    assert draw is not None  # U[0, 1) [n, 1, h, w]
    _towards_(x, 0.85, t[:, :1])
    density = t[:, 1:2]
    # one draw per pixel: below `density` it is a seed, and draw / density is then U(0, 1) again
    hit = draw < density
    seeds = hit * draw.div_(density).mul_(0.4).add_(0.6)  # opacity in [0.6, 1)
    small, large = _grow(seeds, max(1, round(scale))), _grow(seeds, max(1, round(2 * scale)))
    flakes = torch.where(t[:, 2:] > 0, large, small)
    if scale > 1.5:  # corruptions.snow softens flakes with sigma 0.3 px per 32 px: invisible below 48 px
        flakes = _soften(h, scale, x.device) @ flakes @ _soften(w, scale, x.device).T
    _towards_(x, 0.97, flakes.mul_(1.3).clamp_(max=1.0))


@functools.lru_cache(maxsize=32)
def _soften(n: int, scale: float, device: torch.device) -> Tensor:
    """The fixed [n, n] blur (sigma 0.3 px at 32 px) that rounds snow flakes, as corruptions.snow."""
    sigma, radius = _soften_sigma(scale, device)
    return _blur_matrix(sigma, n, radius)[0]


def _soften_sigma(scale: float, device: torch.device) -> tuple[Tensor, int]:
    """The flakes' blur: sigma 0.3 px at 32 px, and its radius."""
    return torch.full((1,), 0.3 * scale, device=device), math.ceil(2.5 * 0.3 * scale)


def _grow(seeds: Tensor, size: int) -> Tensor:
    """Each seed becomes a size x size flake, anchored like corruptions._smear: a running maximum
    over shifted copies along each axis (a tenth of the cost of ``max_pool2d``)."""
    if size <= 1:
        return seeds
    out = seeds
    for axis in (-1, -2):
        n = out.shape[axis]
        grown = out.clone()
        for shift in range(1, size):
            dst = grown.narrow(axis, shift, n - shift)
            torch.maximum(dst, out.narrow(axis, 0, n - shift), out=dst)
        out = grown
    return out


_WEATHER_EFFECTS: dict[str, tuple[Weather, _PerDevice]] = {
    "fog": (_fog, _FOG_PARAMS), "night": (_night, _NIGHT_PARAMS), "noise": (_noise, _NOISE_PARAMS),
    "contrast": (_contrast, _CONTRAST_PARAMS), "snow": (_snow, _SNOW_PARAMS),
}
assert tuple(_WEATHER_EFFECTS) == WEATHER_KINDS


# The random numbers each weather effect works with, per image of size (h, w): the torch path
# (_weather) and the kernel path (_kernel_weather) both draw them here, so they draw the same.
_WEATHER_DRAWS: dict[str, tuple[Callable[..., Tensor], Callable[[int, int], tuple[int, ...]]] | None] = {
    "fog": (_uniform, lambda h, w: (1, 4, 4)), "night": (_normal, lambda h, w: (3, h, w)),
    "noise": (_normal, lambda h, w: (3, h, w)), "contrast": None, "snow": (_uniform, lambda h, w: (1, h, w)),
}


def _weather_draw(name: str, n: int, size: tuple[int, int], g: torch.Generator | None, device: torch.device
                  ) -> Tensor | None:
    """Weather kind ``name``'s random numbers for ``n`` images, [n, *shape] (None: it draws none)."""
    spec = _WEATHER_DRAWS[name]
    return None if spec is None else spec[0]((n, *spec[1](*size)), g, device)


def _kernel_weather(drawn: np.ndarray, cfg: AugmentConfig, g: torch.Generator | None, size: tuple[int, int]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """All the weather's random numbers, drawn kind by kind as :func:`_weather` draws them, and each
    sample's offset into them."""
    kinds = len(cfg.weather_kinds)
    kind = drawn - 1  # -1 blur, then the weather kinds, then erase and none
    rows = np.nonzero((kind >= 0) & (kind < kinds))[0]
    rows = rows[np.argsort(kind[rows], kind="stable")]  # grouped by kind, as _occasional groups them
    kind = kind[rows]
    counts = np.bincount(kind, minlength=kinds)
    per = _draws_per_image(cfg.weather_kinds, size)
    parts = [_weather_draw(name, int(c), size, g, torch.device("cpu")).reshape(-1)  # type: ignore[union-attr]
             for name, c, d in zip(cfg.weather_kinds, counts, per, strict=True) if c and d]
    first = np.cumsum(counts) - counts  # each kind's first row in `rows`
    at = np.zeros(len(drawn), np.int64)
    at[rows] = (np.cumsum(counts * per) - counts * per)[kind] + per[kind] * (np.arange(len(rows)) - first[kind])
    return (torch.cat(parts).numpy() if parts else np.zeros(0, np.float32)), at


@functools.lru_cache(maxsize=16)
def _draws_per_image(kinds: tuple[str, ...], size: tuple[int, int]) -> np.ndarray:
    """How many random numbers each weather kind draws per image."""
    specs = [_WEATHER_DRAWS[name] for name in kinds]
    return np.array([0 if spec is None else math.prod(spec[1](*size)) for spec in specs], np.int64)


@functools.lru_cache(maxsize=32)
def _soften_taps(scale: float, n: int) -> np.ndarray:
    """The taps of :func:`_soften` for the kernel; none where snow is not softened (<= 48 px)."""
    if scale <= 1.5:
        return np.zeros(0, np.float32)
    sigma, radius = _soften_sigma(scale, torch.device("cpu"))
    return _blur_weights(sigma, min(radius, n - 1))[0].numpy()


def _erase(x: Tensor, p: Tensor, stats: tuple[Tensor, Tensor]) -> None:
    """In place: a random-erasing-style occluder, a rectangle of random size, place and flat colour.

    Works on normalised values: the colour, drawn in [0, 1], is normalised instead of the image.
    """
    h, w = x.shape[-2:]
    area, log_aspect, centre = p[:, _ERASE_AREA, None], p[:, _ERASE_ASPECT, None], p[:, _ERASE_Y:_ERASE_X + 1]
    half = torch.exp(log_aspect * _constant((0.5, -0.5), x.device)).mul_(area.sqrt()).mul_(
        _constant((h / 2, w / 2), x.device))  # [n, 2]: half height, half width in pixels
    # a rectangle is separable: rows inside and columns inside
    rows = (_pixel_coords(h, x.device) - centre[:, :1]).abs_() < half[:, :1]  # [n, h]
    cols = (_pixel_coords(w, x.device) - centre[:, 1:]).abs_() < half[:, 1:]  # [n, w]
    inside = (rows[:, None, :, None] & cols[:, None, None, :]).to(x.dtype)
    mean, std = stats
    _towards_(x, (p[:, _ERASE_R:_ERASE_B + 1, None, None] - mean).div_(std), inside)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple[float, ...], device: torch.device) -> Tensor:
    """A small constant tensor, made once per device (making it costs as much as using it)."""
    return torch.tensor(values, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=32)
def _pixel_coords(n: int, device: torch.device) -> Tensor:
    """Pixel centres 0.5, 1.5, ... in pixel units."""
    return torch.arange(n, device=device, dtype=torch.float32) + 0.5
