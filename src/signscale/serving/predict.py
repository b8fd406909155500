"""``Predictor``: one way to ask a trained model about images, shared by the CLI, the service and pipelines.

A predictor is built from a *model spec*:

* a model artefact folder (``model.json`` + ``model.pt``, any storage URL), checksum-verified and
  loaded with ``weights_only`` (:func:`signscale.training.checkpoint.load_model_artefact`);
* an ONNX export folder (``model.json`` + ``model.onnx``, written by ``signscale export``), run with
  onnxruntime on CPU (the ``onnx`` extra);
* ``REGISTRY_URL@ALIAS`` (``s3://bucket/registry@production``): the alias is resolved by
  :func:`signscale.serving.registry.resolve` to a version and a model URL.

Inputs go through exactly the preprocessing the model was trained and evaluated with: decode
(:func:`signscale.images.decode`, which forces the full decode so truncated files fail here and not
deep inside a batch), resize to the model's input size with the same PIL resampling the packer and
the evaluator use (:func:`signscale.images.resize`), then :func:`signscale.transforms.to_input`
inside the network wrapper :class:`ProbabilityModel`, which is also what ``signscale export``
writes to ONNX, so the two back-ends cannot drift apart.

Bad images are data, not crashes: :meth:`Predictor.classify_files` returns one result per input
with either the top-k classes or an ``error`` naming the reason, and never stops at the first bad file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from signscale import calibration, config, images, storage, tta
from signscale.labels import LabelSpace
from signscale.serving.runtime import OnnxRunner, TorchRunner, onnx_bytes
from signscale.training import checkpoint
from signscale.transforms import Preprocess, to_input

__all__ = ["ONNX_FORMAT", "PredictConfig", "PredictError", "Predictor", "ProbabilityModel", "collect_inputs",
           "is_registry_spec", "resolve_model"]

ONNX_FORMAT = "signscale.onnx"
ONNX_FORMAT_VERSION = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Well below Pillow's own bomb limit (~89M pixels): a scene is a few megapixels, a sign far less.
DEFAULT_MAX_PIXELS = 25_000_000
Backend = Literal["auto", "torch", "onnx"]
_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PredictError(ValueError):
    """A model or an input the predictor cannot use; the message names it and what to do."""


@dataclass(frozen=True)
class PredictConfig:
    """Which model to load and how to run it."""

    model: str  # model artefact folder, ONNX export folder, or REGISTRY_URL@ALIAS
    top_k: int = 5
    batch_size: int = 64  # images per forward pass when classifying many files
    backend: Backend = "auto"  # auto: onnx for an export folder, torch for a model artefact
    device: str = "cpu"
    threads: int = 0  # intra-op threads of torch / onnxruntime (0: their default)
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are refused from the header, before decoding
    detector: str = ""  # detector model URL: enables detect() (detect-then-classify on scenes)
    detect_threshold: float = 0.3  # detector score below which a box is dropped
    # below this top-class probability the answer is "unsure" (a field of the result, not a class)
    min_confidence: float = 0.0
    tta: bool = False  # also look at the mirror image where the flip rules allow it (twice the compute)

    def __post_init__(self) -> None:
        if not self.model:
            raise config.ConfigError("model: give a model folder, an ONNX export folder or REGISTRY_URL@ALIAS")
        if self.top_k < 1:
            raise config.ConfigError(f"top_k: must be >= 1, got {self.top_k}")
        if self.batch_size < 1:
            raise config.ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.backend not in ("auto", "torch", "onnx"):
            raise config.ConfigError(f"backend: expected auto, torch or onnx, got {self.backend!r}")
        if self.threads < 0:
            raise config.ConfigError(f"threads: must be >= 0, got {self.threads}")
        if not 0 <= self.detect_threshold <= 1:
            raise config.ConfigError(f"detect_threshold: expected 0..1, got {self.detect_threshold}")
        check_min_confidence(self.min_confidence)
        if not 1 <= self.max_pixels <= 89_478_485:
            raise config.ConfigError(f"max_pixels: must be in 1..89478485 (Pillow's bomb limit), got {self.max_pixels}")


def check_min_confidence(value: float, name: str = "min_confidence") -> float:
    """``value`` if it is a probability, else a ConfigError naming ``name`` (shared with serve's query option)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise config.ConfigError(f"{name}: expected a probability in [0, 1] (e.g. 0.9; 0 never answers unsure), "
                                 f"got {value!r}")
    return float(value)


# ---------------------------------------------------------------------------------------------
# Model specs: plain folders and registry aliases


def is_registry_spec(spec: str) -> bool:
    """True for ``REGISTRY_URL@ALIAS``: an ``@`` in the last path segment before a plain alias name.

    A folder that really is a model (has ``model.json``) wins, so a path that happens to hold an
    ``@`` still loads as a path.
    """
    base, sep, alias = spec.rpartition("@")
    if not sep or not base or "/" in alias or not _ALIAS.match(alias):
        return False
    return not storage.exists(storage.join(spec, "model.json"))


def resolve_model(spec: str) -> tuple[str, str]:
    """``(version, model_url)`` for a spec: a registry alias is resolved, a folder names itself.

    The version of a plain folder is the start of its weights' sha256, and its temperature when it was
    calibrated (``3fa2c9d1e0ab-T1.42``), so a rewritten or recalibrated folder reads as a new version
    to a poller: a running service takes up a new temperature as it takes up new weights.
    """
    if is_registry_spec(spec):
        try:
            from signscale.serving import registry
        except ImportError:
            raise PredictError(f"{spec}: looks like REGISTRY_URL@ALIAS, but this signscale has no model "
                               "registry (signscale.serving.registry); pass a model folder instead") from None
        try:
            version, url = registry.resolve(spec)
        except (ValueError, LookupError, FileNotFoundError) as exc:
            raise PredictError(f"{spec}: cannot resolve the alias ({type(exc).__name__}: {exc}); "
                               "check the registry URL and the alias name (`signscale registry ls`)") from None
        return str(version), str(url)
    meta = _read_meta(spec)
    version = str(meta.get("sha256", ""))[:12] or "unknown"
    t = (meta.get(calibration.CALIBRATION_KEY) or {}).get("temperature")
    if t is not None:
        version += f"-T{t:.6g}" if isinstance(t, (int, float)) else f"-T{str(t)[:12]}"
    return version, spec.rstrip("/")


def _read_meta(url: str) -> dict[str, Any]:
    url = url[: -len("/model.pt")] if url.endswith("/model.pt") else url.rstrip("/")
    meta_url = storage.join(url, "model.json")
    if not storage.exists(meta_url):
        raise PredictError(f"{url}: no model.json here; give a model folder (a training run's model/), an ONNX "
                           "export folder (`signscale export`) or REGISTRY_URL@ALIAS")
    meta = storage.read_json(meta_url)
    if not isinstance(meta, dict):
        raise PredictError(f"{meta_url}: not a signscale model description")
    return meta


# ---------------------------------------------------------------------------------------------
# Back-ends: uint8 [B, S, S, 3] in, float32 probabilities [B, C] out


class ProbabilityModel(torch.nn.Module):
    """The network plus its preprocessing and softmax: resized uint8 NHWC in, probabilities out.

    This is the graph ``signscale export`` writes to ONNX, and what the torch back-end runs, so the
    normalisation lives in one place (:func:`to_input`) for both.
    """

    def __init__(self, model: torch.nn.Module, pre: Preprocess) -> None:
        super().__init__()
        self.model = model
        self.pre = pre

    def forward(self, images_nhwc: torch.Tensor) -> torch.Tensor:
        # While exporting, take to_input's channels-last branch: the same values (permute, cast,
        # scale, shift), but without the in-place copy the tracing exporter cannot express; ONNX has
        # no memory layouts, so the graph is the same computation.
        x = to_input(images_nhwc, self.pre, channels_last=torch.onnx.is_in_onnx_export())
        return self.model(x).float().softmax(1)


def load_torch(url: str, device: torch.device, network: tuple[torch.nn.Module, dict[str, Any]] | None = None
               ) -> tuple[ProbabilityModel, dict[str, Any]]:
    """``network``: what :func:`checkpoint.load_model` returned for ``url``, used rather than read again."""
    try:
        model, meta = network if network is not None else checkpoint.load_model(url)
    except FileNotFoundError as exc:
        raise PredictError(f"{url}: cannot read the model artefact ({exc})") from None
    try:  # a calibrated model's logits are divided by its temperature inside the graph (and an ONNX export)
        model = calibration.with_temperature(model.eval(), meta, where=storage.join(url, "model.json"))
    except calibration.CalibrationError as exc:
        raise PredictError(str(exc)) from None
    return ProbabilityModel(model.eval(), Preprocess.from_dict(meta["preprocess"])), meta


def _load_onnx_folder(url: str, meta: dict[str, Any]) -> bytes:
    if meta.get("format_version") != ONNX_FORMAT_VERSION:
        raise PredictError(f"{url}/model.json: ONNX export format {meta.get('format_version')!r} is not supported "
                           f"(this signscale reads {ONNX_FORMAT_VERSION}); export the model again")
    data = storage.read_bytes(storage.join(url, "model.onnx"))
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise PredictError(f"{url}/model.onnx: sha256 does not match model.json (corrupt or replaced)")
    return data


# ---------------------------------------------------------------------------------------------
# The predictor


class Predictor:
    """A loaded, ready model: label space, preprocessing and a back-end that maps pixels to probabilities.

    Thread-safe for concurrent calls (torch and onnxruntime sessions are); :meth:`probabilities` is
    the one place a batch meets the network.
    """

    def __init__(self, *, run: Callable[[np.ndarray], np.ndarray], backend: str, meta: dict[str, Any], url: str,
                 version: str, top_k: int = 5, max_pixels: int = DEFAULT_MAX_PIXELS, batch_size: int = 64,
                 detector: str = "", detect_threshold: float = 0.3, min_confidence: float = 0.0,
                 tta: bool = False) -> None:
        self._run = run
        self.backend = backend
        self.meta = meta
        self.url = url
        self.version = version
        self.top_k = top_k
        self.max_pixels = max_pixels
        self.batch_size = batch_size
        self.label_space = LabelSpace.from_dict(meta["label_space"])
        self.preprocess = Preprocess.from_dict(meta["preprocess"])
        self.detector = detector
        self.detect_threshold = detect_threshold
        self.min_confidence = min_confidence
        self.tta = tta
        self.flip_map = torch.from_numpy(self.label_space.flip_map())
        self._pipeline: Any = None
        self._pipeline_lock = threading.Lock()

    # -- construction

    @classmethod
    def load(cls, cfg: PredictConfig | str, *, network: tuple[torch.nn.Module, dict[str, Any]] | None = None,
             **overrides: Any) -> Predictor:
        """Resolve, verify and load ``cfg.model``; ``Predictor.load("runs/x/model")`` works too.

        ``network``: the (network, metadata) :func:`checkpoint.load_model` already returned for the
        model, for the torch back-end to use rather than read and verify the model again."""
        if isinstance(cfg, str):
            cfg = PredictConfig(model=cfg, **overrides)
        version, url = resolve_model(cfg.model)
        return cls.load_url(url, version=version, cfg=cfg, network=network)

    @classmethod
    def load_url(cls, url: str, *, version: str, cfg: PredictConfig,
                 network: tuple[torch.nn.Module, dict[str, Any]] | None = None) -> Predictor:
        """Load an already-resolved model URL (what a reloading service calls for each new version)."""
        if cfg.threads and cfg.backend != "onnx":
            torch.set_num_threads(cfg.threads)
        meta = _read_meta(url)
        common = {"meta": meta, "url": url, "version": version, "top_k": cfg.top_k, "max_pixels": cfg.max_pixels,
                  "batch_size": cfg.batch_size, "detector": cfg.detector, "detect_threshold": cfg.detect_threshold,
                  "min_confidence": cfg.min_confidence, "tta": cfg.tta}
        if meta.get("format") == ONNX_FORMAT:
            if cfg.backend == "torch":
                raise PredictError(f"{url}: this is an ONNX export; use backend onnx (or auto), or the original "
                                   f"model folder ({meta.get('source', {}).get('url', '?')}) for torch")
            return cls(run=OnnxRunner(_load_onnx_folder(url, meta), cfg.threads), backend="onnx", **common)
        module, meta = load_torch(url, torch.device(cfg.device), network)
        common["meta"] = meta
        if cfg.backend == "onnx":  # export in memory: same graph as `signscale export` writes
            return cls(run=OnnxRunner(onnx_bytes(module), cfg.threads), backend="onnx", **common)
        return cls(run=TorchRunner(module, torch.device(cfg.device)), backend="torch", **common)

    # -- the core

    def prepare(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> the model's [S, S, 3] uint8 input; raises :class:`images.ImageError`."""
        return images.resize(images.decode(data, max_pixels=self.max_pixels), self.preprocess.image_size)

    def resize(self, arr: np.ndarray) -> np.ndarray:
        """An HxWx3 uint8 array -> the model's [S, S, 3] input (the packer's and evaluator's resize)."""
        if not (isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3):
            raise images.ImageError("bad_array", f"expected an HxWx3 uint8 array, got {getattr(arr, 'shape', arr)!r}")
        return images.resize(arr, self.preprocess.image_size)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """[B, S, S, 3] uint8 (already :meth:`prepare`-d) -> float32 [B, C] class probabilities.

        Calibrated when the model carries a temperature (it is inside the network), and with
        flip-rule test-time augmentation when the predictor was loaded with ``tta``.
        """
        if batch.shape[0] == 0:
            return np.zeros((0, len(self.label_space)), np.float32)
        out = []
        for i in range(0, batch.shape[0], self.batch_size):
            chunk = batch[i:i + self.batch_size]
            probs = np.asarray(self._run(chunk), dtype=np.float32)
            if self.tta:
                mirrored = np.asarray(self._run(tta.flip_images(chunk)), dtype=np.float32)
                probs = tta.combine(torch.from_numpy(probs), torch.from_numpy(mirrored), self.flip_map).numpy()
            out.append(probs)
        return np.concatenate(out)

    def unsure(self, probs: np.ndarray, min_confidence: float | None = None) -> np.ndarray:
        """[B] bool: rows whose top probability is below ``min_confidence`` (default: the predictor's)."""
        threshold = self.min_confidence if min_confidence is None else min_confidence
        return probs.max(1) < threshold if probs.size else np.zeros(len(probs), dtype=bool)

    def answers(self, probs: np.ndarray, top_k: int | None = None, min_confidence: float | None = None
                ) -> list[dict[str, Any]]:
        """Per row: ``{"top_k": [...], "unsure": bool}``; unsure rows still carry their top-k, so a
        caller can show the best guess, but must not act on it as an answer."""
        return [{"top_k": t, "unsure": bool(u)}
                for t, u in zip(self.top(probs, top_k), self.unsure(probs, min_confidence))]

    def top(self, probs: np.ndarray, k: int | None = None) -> list[list[dict[str, Any]]]:
        """Per row of probabilities: the ``k`` most likely classes, each as plain JSON-able data."""
        k = min(k or self.top_k, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[self._label(int(i), float(p[i])) for i in row] for p, row in zip(probs, order)]

    def _label(self, i: int, p: float) -> dict[str, Any]:
        c = self.label_space[i]
        return {"id": i, "key": c.key, "name": c.name, "country": c.country, "probability": p}

    def classify(self, inputs: Sequence[np.ndarray | bytes], top_k: int | None = None) -> list[list[dict[str, Any]]]:
        """Top-k classes for each image (encoded bytes or HxWx3 uint8 arrays); bad input raises ImageError."""
        arrays = [self.prepare(x) if isinstance(x, (bytes, bytearray, memoryview)) else self.resize(x)
                  for x in inputs]
        size = self.preprocess.image_size
        batch = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
        return self.top(self.probabilities(batch), top_k)

    def classify_files(self, urls: Iterable[str], top_k: int | None = None) -> list[dict[str, Any]]:
        """One result per file: ``{"input", "top_k": [...], "unsure"}`` or ``{"input", "error": {reason, message}}``."""
        results: list[dict[str, Any]] = []
        pending: list[tuple[int, np.ndarray]] = []

        def flush() -> None:
            if pending:
                answers = self.answers(self.probabilities(np.stack([a for _, a in pending])), top_k)
                for (slot, _), a in zip(pending, answers):
                    results[slot].update(a)
                pending.clear()

        for url in urls:
            results.append({"input": url})
            try:
                pending.append((len(results) - 1, self.prepare(storage.read_bytes(url))))
            except images.ImageError as exc:
                results[-1]["error"] = {"reason": exc.reason, "message": str(exc)}
            except IsADirectoryError:  # e.g. a glob matched a folder named x.png
                results[-1]["error"] = {"reason": "not_a_file", "message": f"{url} is a folder, not a file"}
            except OSError as exc:  # missing file, unreachable URL: this input only
                results[-1]["error"] = {"reason": "unreadable", "message": f"{type(exc).__name__}: {exc}"}
            if len(pending) >= self.batch_size:
                flush()
        flush()
        return results

    def warmup(self, batch_sizes: Sequence[int] = (1, 8)) -> None:
        """Run the network once per batch size, so the first real request does not pay for allocation."""
        size = self.preprocess.image_size
        for b in batch_sizes:
            probs = self.probabilities(np.full((b, size, size, 3), 127, np.uint8))
            if probs.shape != (b, len(self.label_space)) or not np.isfinite(probs).all():
                raise PredictError(f"{self.url}: warm-up gave {probs.shape} probabilities with non-finite values; "
                                   "the model is broken")

    # -- scenes

    def detect(self, scenes: Sequence[np.ndarray]) -> list[list[dict[str, Any]]]:
        """Detect-then-classify: per scene, boxes with the classified sign (needs ``detector``)."""
        return self._detection_pipeline().detect(list(scenes))

    def _detection_pipeline(self) -> Any:
        if not self.detector:
            raise PredictError("detection is not enabled: give a detector model (--detector URL)")
        with self._pipeline_lock:
            if self._pipeline is None:
                try:
                    from signscale.detection import detect
                except ImportError:
                    raise PredictError(
                        "detection needs signscale.detection.detect, which this signscale does not have"
                    ) from None
                self._pipeline = detect.load_pipeline(self.detector, self.url, score_thresh=self.detect_threshold)
        return self._pipeline

    # -- description

    def info(self) -> dict[str, Any]:
        """What ``GET /v1/model`` returns: version, label space, preprocessing and training metrics."""
        meta = self.meta
        cfg = meta.get("model_config", {})
        return {"version": self.version, "url": self.url, "backend": self.backend, "sha256": meta.get("sha256"),
                "architecture": cfg.get("name"), "num_classes": len(self.label_space),
                "label_space": {"name": self.label_space.name, "fingerprint": self.label_space.fingerprint(),
                                "classes": [{"id": i, "key": c.key, "name": c.name, "country": c.country}
                                            for i, c in enumerate(self.label_space.classes)]},
                "preprocess": {**self.preprocess.to_dict(), "data_crop": meta.get("data_crop", "none"),
                               "resize": "PIL bilinear (antialiased) to size x size"},
                "metrics": json.loads(json.dumps(meta.get("metrics", {}), default=str)),
                # temperature scaling, applied inside the model (None: never calibrated, T = 1)
                "calibration": meta.get(calibration.CALIBRATION_KEY),
                "min_confidence": self.min_confidence, "tta": self.tta,
                "detector": self.detector or None}


# ---------------------------------------------------------------------------------------------
# Inputs for the CLI


def collect_inputs(items: Sequence[str]) -> list[str]:
    """Files, folders (recursively, image suffixes), globs and URLs -> a sorted-per-item list of URLs."""
    out: list[str] = []
    for item in items:
        if any(ch in item for ch in "*?["):
            found = sorted(storage.glob(item))
            if not found:
                raise PredictError(f"{item}: the pattern matches no file")
            out.extend(found)
        elif storage.is_local(item) and os.path.isdir(storage.local_path(item) or item):
            root = storage.local_path(item) or item
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                           if f.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise PredictError(f"{item}: the folder holds no image ({', '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        else:
            out.append(item)  # a file or a URL: a missing one becomes that input's error, not a crash
    return out
