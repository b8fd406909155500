"""Training augmentation, a whole batch at a time: uint8 NHWC batches in, normalised float32 NCHW out.

It works on whatever device the batch is on (CPU inside DataLoader workers, or the GPU after the
transfer), and with every effect off returns exactly :func:`signscale.transforms.to_input`.
:class:`BatchAugment` is the training augmentation. On 32 px signs the per-sample Python of a
torchvision pipeline costs far more than the pixel work (it manages under 3,000 images a second
per core), so every stage here is one batched operation for the whole batch:

1. brightness, contrast, saturation, the opt-in re-colouring of the design (:mod:`.colour`) and
   the normalisation are all linear in the colour channels, so together they are one 3x3 matrix
   and offset per sample: ONE ``baddbmm``;
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
which training does not use, remain unseen conditions there). Camera faults (opt-in: ``camera``) are
not re-implemented: :mod:`signscale.training.camera` applies the numpy ones to the finished pixels.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import get_worker_info

from signscale import config
from signscale.corruptions import CAMERA_FAULTS

try:
    from signscale import kernels
except ImportError:  # no numba (a Python it has no wheels for yet): the torch path does the work
    kernels = None  # type: ignore[assignment]
from signscale.training import camera
from signscale.training.colour import LUMA, lighting_matrices, style_matrices
from signscale.training.filters import BLUR_LEVELS, blur_bank, blur_taps, separable, uniform
from signscale.training.geometry import sampling_matrices, warp
from signscale.training.weather import (
    WEATHER_EFFECTS,
    draws_per_image,
    fog_rows,
    soften_taps,
    towards_,
    upsampler,
    weather_draw,
)
from signscale.transforms import (
    REFERENCE_PX,
    Padding,
    Preprocess,
    check_images,
    layout,
    resize,
    to_float_nchw,
    to_input,
)

WEATHER_KINDS: tuple[str, ...] = ("fog", "night", "noise", "contrast", "snow")


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation for sign crops; each magnitude is the maximum of a per-sample draw.

    Defaults are mild on purpose: a sign crop is already centred and tight, and the model must still
    tell a 30 from an 80, so large rotations, crops or occlusions would destroy the label. There is
    no hue jitter by default, also on purpose: colour carries meaning (red prohibits, blue mandates).
    ``hue``, ``colour_cast`` and ``grayscale`` re-colour the design itself, for a model that must read
    other countries' paint (:mod:`signscale.training.colour`). A sample gets at most one of blur,
    weather and erase (stacking them rarely leaves a readable sign).
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
    # The design's own colours, off by default (training/colour.py): for reading other countries' paint.
    hue: float = 0.0  # Degrees of hue rotation about the grey axis, uniform in [-hue, hue]
    colour_cast: float = 0.0  # a gain per channel in [1 - c, 1 + c]: a white plate turns yellow
    grayscale: float = 0.0  # probability of a grey image
    blur: float = 0.1  # probability of a Gaussian blur (defocus, motion); at most one of blur, weather
    #                    and erase per sample, so their probabilities add up to at most 1
    blur_sigma: tuple[float, float] = (0.4, 1.2)  # pixels at 32 px
    weather: float = 0.1  # probability of one weather effect
    weather_kinds: tuple[str, ...] = WEATHER_KINDS  # a kind listed twice is drawn twice as often
    weather_severity: int = 3  # severities drawn from 1..weather_severity (the corruptions' scale)
    erase: float = 0.15  # probability of an occluding rectangle (sticker, branch, snow patch)
    erase_area: tuple[float, float] = (0.02, 0.1)  # fraction of the image it covers
    # probability of a camera fault (training/camera.py), on top of all the above; 0: off
    camera: float = 0.0
    camera_kinds: tuple[str, ...] = CAMERA_FAULTS  # a kind listed twice is drawn twice as often
    camera_severity: tuple[int, int] = (1, 3)  # severities drawn from min..max (the corruptions' scale)

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
        _check_style(self)
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
        camera.check(self.camera, self.camera_kinds, self.camera_severity)

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
        return bool(self.brightness or self.contrast or self.saturation or self.style)

    @property
    def style(self) -> bool:
        """Whether any term that re-colours the design is on (each adds its own draws)."""
        return bool(self.hue or self.colour_cast or self.grayscale)


def _check_style(cfg: AugmentConfig) -> None:
    if not 0.0 <= cfg.hue <= 180.0:
        raise ValueError(f"hue: degrees of rotation in [0, 180], got {cfg.hue}")
    if not 0.0 <= cfg.colour_cast < 1.0:
        raise ValueError(f"colour_cast: must be in [0, 1) (a gain of 0 or less blanks a channel), "
                         f"got {cfg.colour_cast}")
    if not 0.0 <= cfg.grayscale <= 1.0:
        raise ValueError(f"grayscale: a probability must be in [0, 1], got {cfg.grayscale}")
    if cfg.grayscale and cfg.padding == "zeros":
        raise ValueError("grayscale with padding=zeros: a grey image cannot show the data set's mean colour "
                         "in the area a transform exposes; use padding=border or reflection")


def _check_range(name: str, r: tuple[float, float], *, low: float, high: float = math.inf) -> None:
    if len(r) != 2 or not low <= r[0] <= r[1] <= high:
        raise ValueError(f"{name}: expected (min, max) with {low} <= min <= max <= {high}, got {r}")


# Columns of the per-sample draws. One [B, _NCOLS] uniform draw per batch means a sample's
# parameters do not depend on which effects the other samples drew; one multiply-add then maps
# every column to its natural unit (radians, zoom factor, pixels, ...), see _param_ranges.
_ROT, _SCALE, _TX, _TY, _PX, _PY, _FLIP, _BRIGHT, _CONTRAST, _SAT = range(10)
_EFFECT, _BLUR_SIGMA, _SEVERITY, _WEATHER_VALUE = range(10, 14)
_ERASE_AREA, _ERASE_ASPECT, _ERASE_Y, _ERASE_X, _ERASE_R, _ERASE_G, _ERASE_B = range(14, 21)
# The style columns (hue, grayscale, three channel gains) come from a second draw made only when a
# style term is on, so every other config keeps the exact random stream it always had.
_BASE_COLS = 21
_HUE, _GREY, _CAST = 21, 22, 23
_NCOLS = 26


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
        check_images(images_uint8_nhwc)
        self._check_labels(labels, images_uint8_nhwc.shape[0])
        if not self.cfg.enabled or images_uint8_nhwc.shape[0] == 0:
            return to_input(images_uint8_nhwc, self.pre, channels_last=self.channels_last), labels
        k = self._constants(images_uint8_nhwc.device, self.pre)
        x, new_labels = self._augment(images_uint8_nhwc, labels, generator, k)
        torch.minimum(torch.maximum(x, k.lo, out=x), k.hi, out=x)  # (clamp with tensor bounds is slower)
        x = camera.fault_normalised_(x, k.scale, k.bias, self.cfg, generator)
        return layout(x, self.channels_last), new_labels

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
        check_images(images_uint8_nhwc)
        self._check_labels(labels, images_uint8_nhwc.shape[0])
        size = self.pre.image_size
        if not self.cfg.enabled or images_uint8_nhwc.shape[0] == 0:
            if images_uint8_nhwc.shape[1:3] == (size, size):
                return images_uint8_nhwc, labels
            x = resize(to_float_nchw(images_uint8_nhwc, channels_last=False), size)
            return _rounded_pixels(x.add_(0.5).clamp_(0.5, 255.5), shared), labels
        # "Normalised" here means pixel + 0.5 (std 1/255): every step below keeps its meaning, the
        # clamp's bounds become 0.5 and 255.5, and truncation is then rounding. With zeros padding
        # the exposed area must show the data set's mean colour, as in __call__, so that space is
        # centred on the mean and shifted back after the clamp.
        centred = self.cfg.padding == "zeros"
        half = (-0.5 / 255,) * 3
        k = self._constants(images_uint8_nhwc.device, _pixel_space(size, self.pre.mean if centred else half))
        if self._use_kernel(images_uint8_nhwc):
            px, new_labels = self._kernel_pixels(images_uint8_nhwc, labels, generator, k, shared)
        else:
            x, new_labels = self._augment(images_uint8_nhwc, labels, generator, k)
            px = _rounded_pixels(self._pixel_clamp(x, k), shared)
        return camera.fault_pixels_(px, self.cfg, generator), new_labels

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
                and images.shape[1:3] == (self.pre.image_size, self.pre.image_size))

    def _kernel_pixels(self, images: Tensor, labels: Tensor, generator: torch.Generator | None,
                       k: _Constants, shared: bool) -> tuple[Tensor, Tensor]:
        """:meth:`pixels` with colour, geometry, the occasional effect, clamp and rounding in one
        compiled pass per image (:func:`signscale.kernels.augment`).

        The draws are the torch path's own, from the same generator in the same order (the
        per-sample draws, then each weather kind's random numbers), and the kernel derives the
        matrices from them as the torch path does: both give the same pixels up to float rounding.
        """
        cfg, (n, h, w, _) = self.cfg, images.shape
        p = _draws(cfg, n, generator, images.device, k)
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
        p = _draws(cfg, images_uint8_nhwc.shape[0], generator, device, k)
        flip = (p[:, _FLIP] < cfg.flip) & (k.flip_map[labels.to(device)] >= 0)
        # Without geometry the colour step's output is the result, so it must be a fresh tensor.
        x = self._normalised(images_uint8_nhwc, p, k, into_scratch=cfg.geometric)
        if cfg.geometric:
            tilt = p[:, _PX:_PY + 1] if cfg.perspective > 0 else None
            m = sampling_matrices(p[:, _ROT], p[:, _SCALE], p[:, _TX:_TY + 1], tilt, flip, x.shape[-2], x.shape[-1])
            grid = self._scratch("grid", (x.shape[0], 2, x.shape[-2], x.shape[-1]), device)
            x = warp(x, m, cfg.padding, projective=cfg.perspective > 0, grid=grid)
        x = self._occasional(x, p, k, generator)
        flip_map = k.flip_map if labels.device == device else self.flip_map.to(labels.device)
        return x, torch.where(flip.to(labels.device), flip_map[labels], labels)

    def _normalised(self, images: Tensor, p: Tensor, k: _Constants, *, into_scratch: bool) -> Tensor:
        """uint8 NHWC -> resized, colour-jittered, normalised float NCHW."""
        n, h, w, _ = images.shape
        size = self.pre.image_size
        resized = (h, w) != (size, size)
        if into_scratch and not resized:
            x = self._scratch("input", (n, 3, h, w), images.device).copy_(images.permute(0, 3, 1, 2))
        else:
            x = resize(to_float_nchw(images, channels_last=False), size)
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
        (one 3x3 matrix and offset per sample, see :mod:`signscale.training.colour`)."""
        n = x.shape[0]
        matrix, shift = lighting_matrices(p[:, _BRIGHT], p[:, _CONTRAST], p[:, _SAT], k.luma)
        if self.cfg.style:
            style = style_matrices(p[:, _HUE], p[:, _CAST:_CAST + 3])
            matrix = matrix @ style
            mean_luma = (x.mean(dim=(2, 3)) * (k.luma @ style)).sum(1)  # of the re-coloured crop
        else:
            mean_luma = x.mean(dim=(2, 3)) @ k.luma  # [B], in [0, 255], of the whole unwarped crop
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
        scale = min(x.shape[-2:]) / REFERENCE_PX
        blur, weather, erase = _slices(counts[0], sum(counts[1:-1]), counts[-1])
        if counts[0]:
            rows, cols = (blur_bank(n, cfg.blur_sigma, scale, x.device) for n in x.shape[-2:])
            level = ps[blur, _BLUR_SIGMA].long()
            xs[blur] = separable(xs[blur], rows[level], cols[level])
        if weather.stop > weather.start:
            pixels = xs[weather].mul_(k.std).add_(k.mean).clamp_(0.0, 1.0)
            _weather(pixels, ps[weather], counts[1:-1], cfg, g, scale)
            pixels.mul_(k.unit_scale).add_(k.unit_bias)
        if counts[-1]:
            _erase(xs[erase], ps[erase], (k.mean, k.std))
        x.index_copy_(0, idx, xs)
        return x


def _draws(cfg: AugmentConfig, n: int, g: torch.Generator | None, device: torch.device, k: _Constants) -> Tensor:
    """[n, _NCOLS] per-sample parameters in their units; grayscale is a saturation of 0."""
    u = uniform((n, _BASE_COLS), g, device)
    style = uniform((n, _NCOLS - _BASE_COLS), g, device) if cfg.style else u.new_zeros((n, _NCOLS - _BASE_COLS))
    p = torch.cat([u, style], 1).mul_(k.span).add_(k.low)
    if cfg.grayscale:
        p[:, _SAT].masked_fill_(p[:, _GREY] < cfg.grayscale, 0.0)
    return p


@functools.lru_cache(maxsize=8)
def _kernel_codes(weather_kinds: tuple[str, ...]) -> np.ndarray:
    """The kernel's effect code for each categorical draw: blur, each weather kind, erase, none."""
    weather = [kernels.WEATHER[name] for name in weather_kinds]
    return np.array([kernels.BLUR, *weather, kernels.ERASE, kernels.PLAIN], dtype=np.int32)


def _kernel_setup(cfg: AugmentConfig, k: _Constants, h: int, w: int) -> Any:
    """The kernel's per-config inputs (:class:`signscale.kernels.Setup`), with this module's tables."""
    scale = min(h, w) / REFERENCE_PX
    columns = {"rotate": _ROT, "zoom": _SCALE, "shift_x": _TX, "shift_y": _TY, "tilt_x": _PX, "tilt_y": _PY,
               "brightness": _BRIGHT, "contrast": _CONTRAST, "saturation": _SAT, "blur_level": _BLUR_SIGMA,
               "severity": _SEVERITY, "fog_grey": _WEATHER_VALUE, "erase_area": _ERASE_AREA,
               "erase_log_aspect": _ERASE_ASPECT, "erase_y": _ERASE_Y, "erase_x": _ERASE_X, "erase_r": _ERASE_R,
               "erase_g": _ERASE_R + 1, "erase_b": _ERASE_B, "hue": _HUE, "cast_r": _CAST, "cast_g": _CAST + 1,
               "cast_b": _CAST + 2}
    weather = np.zeros((len(kernels.WEATHER), 5, 5), np.float32)
    for name, code in kernels.WEATHER.items():
        values = np.asarray(WEATHER_EFFECTS[name][1].values, np.float32)
        weather[code - min(kernels.WEATHER.values()), :, :values.shape[1]] = values
    cpu = torch.device("cpu")
    return kernels.Setup(
        columns=np.array([columns[name] for name in kernels.PARAMETERS], np.int64), projective=cfg.perspective > 0,
        padding=cfg.padding, luma=k.luma.numpy(), fill=(-k.bias).reshape(3).numpy(),
        blur_taps=blur_taps(cfg.blur_sigma, scale, min(h, w)), weather=weather, max_severity=cfg.weather_severity,
        fog_rows=fog_rows(h, cpu).numpy(), fog_cols=upsampler(w, 4, cpu).numpy(),
        snow_sizes=np.array([max(1, round(scale)), max(1, round(2 * scale))], dtype=np.int64),
        soften=soften_taps(scale, min(h, w)))


@functools.lru_cache(maxsize=8)
def _pixel_space(size: int, mean: tuple[float, float, float]) -> Preprocess:
    """A "normalisation" to pixel value - 255 * mean, so BatchAugment's steps work in pixel units."""
    return Preprocess(image_size=size, mean=mean, std=(1 / 255,) * 3)


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
                kernels.warm(augment.pre.image_size)  # here, in the process that forks the workers

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

        luma = t(LUMA)
        scale, bias = pre.scale_bias(device)
        return cls(flip_map=flip_map.to(device), luma=luma, mean=t(pre.mean).view(1, 3, 1, 1),
                   std=t(pre.std).view(1, 3, 1, 1),
                   scale=scale, bias=bias, scale3=scale.view(3, 1), bias3=bias.view(1, 3),
                   unit_scale=scale * 255.0, unit_bias=bias,
                   **_pixel_bounds(scale, bias), **_param_ranges(cfg, pre.image_size, device),
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
    ranges[_BLUR_SIGMA] = (0.0, BLUR_LEVELS - 1e-3)  # floor: which of the blur bank's sigmas
    ranges[_SEVERITY] = (0.0, float(cfg.weather_severity))  # floor: severity - 1
    ranges[_WEATHER_VALUE] = (0.68, 0.14)  # fog's grey, as corruptions.fog
    ranges[_ERASE_AREA] = (cfg.erase_area[0], cfg.erase_area[1] - cfg.erase_area[0])  # fraction of the image
    ranges[_ERASE_ASPECT] = (math.log(0.5), math.log(4.0))  # log of height / width, in [1/2, 2]
    ranges[_ERASE_Y] = ranges[_ERASE_X] = (0.0, float(size))  # centre, pixels
    ranges[_HUE] = (-math.radians(cfg.hue), 2 * math.radians(cfg.hue))  # radians
    ranges[_CAST:_CAST + 3] = [(1 - cfg.colour_cast, 2 * cfg.colour_cast)] * 3  # gain
    low, span = torch.tensor(ranges, dtype=torch.float32, device=device).unbind(1)
    return {"low": low, "span": span}


def _pixel_bounds(scale: Tensor, bias: Tensor) -> dict[str, Tensor]:
    """Per channel, what pixels 0 and 255 normalise to, computed in float32 exactly as the data is.

    (Bounds computed in double can sit one rounding step inside the float32 value of a black or
    white pixel, and the clamp would then nudge pixels that augmentation never touched.)
    """
    return {"lo": 0.0 * scale + bias, "hi": 255.0 * scale + bias}


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
    towards_(x, (p[:, _ERASE_R:_ERASE_B + 1, None, None] - mean).div_(std), inside)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple[float, ...], device: torch.device) -> Tensor:
    """A small constant tensor, made once per device (making it costs as much as using it)."""
    return torch.tensor(values, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=32)
def _pixel_coords(n: int, device: torch.device) -> Tensor:
    """Pixel centres 0.5, 1.5, ... in pixel units."""
    return torch.arange(n, device=device, dtype=torch.float32) + 0.5


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
            effect, table = WEATHER_EFFECTS[name]
            draw = weather_draw(name, rows.stop - rows.start, tuple(x.shape[-2:]), g, x.device)
            effect(x[rows], table[x.device][level[rows]], p[rows, _WEATHER_VALUE], draw, scale)


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
    per = draws_per_image(cfg.weather_kinds, size)
    parts = [weather_draw(name, int(c), size, g, torch.device("cpu")).reshape(-1)  # type: ignore[union-attr]
             for name, c, d in zip(cfg.weather_kinds, counts, per, strict=True) if c and d]
    first = np.cumsum(counts) - counts  # each kind's first row in `rows`
    at = np.zeros(len(drawn), np.int64)
    at[rows] = (np.cumsum(counts * per) - counts * per)[kind] + per[kind] * (np.arange(len(rows)) - first[kind])
    return (torch.cat(parts).numpy() if parts else np.zeros(0, np.float32)), at
