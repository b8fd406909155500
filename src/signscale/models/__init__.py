"""Model registry: build a classifier by name, describe it, and rebuild it from plain data.

A model is a pure ``nn.Module`` (see :mod:`signscale.models.cnn`); everything needed to rebuild its
architecture is one plain, JSON-able dict that travels inside every checkpoint and model file::

    {"format": 1, "name": "msnet", "num_classes": 43, "kwargs": {"widths": [32, 64, 128], ...}}

``kwargs`` is stored *resolved*: every keyword of the builder with the value actually used,
defaults included, so that changing a default later does not silently change the architecture a
saved model is rebuilt with (the state dict would then fail to load, or worse, load into a different
network of the same shapes).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from signscale.models.cnn import MultiScaleNet, ResNet18Small, SmallCNN

__all__ = ["MODELS", "MODEL_CONFIG_FORMAT", "ModelSpec", "create_model", "grow_head", "model_config", "model_info",
           "rebuild"]

MODEL_CONFIG_FORMAT = 1
CONFIG_ATTR = "signscale_config"


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture: its builder and the keyword defaults that set it apart.

    ``defaults`` lets one class serve several names (``stn_msnet`` is ``MultiScaleNet`` with
    ``stn=True``) without a wrapper function that would have to repeat every keyword.
    """

    name: str
    build: Callable[..., nn.Module]  # build(num_classes, **kwargs); keyword-only options
    summary: str
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def options(self) -> dict[str, Any]:
        """Every keyword the builder accepts, with this spec's default value."""
        params = inspect.signature(self.build).parameters
        opts = {k: p.default for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        return {**opts, **self.defaults}


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("small_cnn", SmallCNN, "3 conv-BN-ReLU blocks, global pool, linear; fast baseline"),
        ModelSpec("msnet", MultiScaleNet, "multi-scale CNN (Sermanet & LeCun 2011): all stages feed the head"),
        ModelSpec("stn_msnet", MultiScaleNet, "msnet behind an affine spatial transformer (Arcos-Garcia 2018)",
                  defaults={"stn": True}),
        ModelSpec("resnet18_small", ResNet18Small, "torchvision ResNet-18, 3x3 stride-1 stem, no max-pool"),
    )
}


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _spec(name: str) -> ModelSpec:
    if name in MODELS:
        return MODELS[name]
    raise ValueError(f"unknown model {name!r}{_did_you_mean(name, list(MODELS))} "
                     f"(valid names: {', '.join(sorted(MODELS))})")


def _plain(value: Any, where: str) -> Any:
    """``value`` as JSON-able plain data (tuples become lists), or a ValueError naming ``where``.

    Checkpoints are loaded with ``weights_only=True``, which refuses arbitrary objects; failing here,
    at construction, is kinder than failing when the first checkpoint is written.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise ValueError(f"model option {where} must be plain data (number, string, bool, list, dict), "
                     f"got {type(value).__name__}")


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build registered model ``name`` with ``num_classes`` outputs; ``kwargs`` override its options.

    The returned module carries its resolved plain config as ``model.signscale_config``.
    """
    spec = _spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    options = spec.options()
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(f"model {name!r} has no option {unknown[0]!r}{_did_you_mean(unknown[0], list(options))} "
                         f"(valid: {', '.join(sorted(options))})")
    resolved = {k: _plain(v, k) for k, v in {**options, **kwargs}.items()}
    model = spec.build(num_classes, **resolved)
    setattr(model, CONFIG_ATTR, {"format": MODEL_CONFIG_FORMAT, "name": name, "num_classes": num_classes,
                                 "kwargs": resolved})
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    """The registered model inside a wrapper that keeps it as ``.module`` (DistributedDataParallel)."""
    while not hasattr(model, CONFIG_ATTR) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def model_config(model: nn.Module) -> dict[str, Any]:
    """The plain dict :func:`rebuild` needs; a copy, so editing it cannot change the model's record."""
    config = getattr(_unwrap(model), CONFIG_ATTR, None)
    if config is None:
        raise ValueError(f"{type(model).__name__} was not built by signscale.models.create_model, "
                         "so it has no config to rebuild it from")
    return _plain(config, "config")


def rebuild(config: Mapping[str, Any]) -> nn.Module:
    """A freshly initialised model with the architecture ``config`` (from :func:`model_config`) describes."""
    missing = [k for k in ("name", "num_classes") if k not in config]
    if missing:
        raise ValueError(f"model config lacks {', '.join(missing)}: {dict(config)}")
    fmt = config.get("format", MODEL_CONFIG_FORMAT)
    if fmt > MODEL_CONFIG_FORMAT:
        raise ValueError(f"model config format {fmt} is newer than this signscale reads "
                         f"({MODEL_CONFIG_FORMAT}); upgrade signscale")
    return create_model(config["name"], config["num_classes"], **dict(config.get("kwargs", {})))


def model_info(model: nn.Module, input_size: int = 32) -> dict[str, int]:
    """Parameter count and multiply-accumulates for one ``input_size`` x ``input_size`` RGB image.

    MACs are half the FLOPs torch's public ``FlopCounterMode`` counts for one forward in eval mode:
    convolutions and matrix products, which is where practically all the work of these models is;
    normalisation, activations, pooling and the STN's resampling are not counted.
    """
    params = sum(p.numel() for p in model.parameters())
    first = next(model.parameters(), None)
    x = torch.zeros(1, 3, input_size, input_size,
                    device=first.device if first is not None else None,
                    dtype=first.dtype if first is not None else None)
    was_training = model.training
    model.eval()  # BatchNorm cannot run in training mode on a batch of one
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return {"params": int(params), "macs": int(counter.get_total_flops() // 2)}


def grow_head(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
              source_rows: list[int]) -> nn.Module:
    """A trained model with a new set of outputs: output ``i`` is old output ``source_rows[i]`` (-1: new).

    Everything but the head loads unchanged, and kept outputs keep their weight rows, so before any
    fine-tuning the logits of the old classes are exactly the old model's. New rows start as a fresh
    ``nn.Linear`` would, which is how a model is extended to a new country's classes.
    """
    old = int(config["num_classes"])
    bad = [r for r in source_rows if not -1 <= r < old]
    if bad:
        raise ValueError(f"grow_head: source rows {bad[:5]} are outside the old head's 0..{old - 1}")
    model = rebuild({**config, "num_classes": len(source_rows)})
    fresh = model.state_dict()
    merged = dict(state_dict)
    for name in ("head.weight", "head.bias"):
        rows = fresh[name].clone()
        kept = [(i, r) for i, r in enumerate(source_rows) if r >= 0]
        if kept:
            new_i, old_i = zip(*kept)
            rows[list(new_i)] = state_dict[name][list(old_i)].to(rows.dtype)
        merged[name] = rows
    model.load_state_dict(merged)
    return model
