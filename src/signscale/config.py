"""YAML files and ``--key=value`` overrides into frozen dataclass configs.

Each module owns its config dataclass (``PackConfig`` in pack.py, ``TrainConfig`` in train.py);
this module only turns text into those objects, so library code never sees argparse or the
environment. Unknown keys are errors that name the closest valid key, because a typo in a
training config that is silently ignored costs a whole run.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key."""


# Numeric precision, named once for every config that has one (train, train-detector, evaluate,
# calibrate, bench); what each one does on a device is signscale.training.precision's.
Precision = typing.Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)


def check_precision(name: str) -> Precision:
    """``name`` if it is a precision, else a ConfigError that lists them."""
    if name not in PRECISIONS:
        raise ConfigError(f"precision: expected {', '.join(PRECISIONS)}, got {name!r}")
    return name  # type: ignore[return-value]


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    near = closest(key, valid)
    hint = f" Did you mean '{near}'?" if near else f" Valid keys: {', '.join(sorted(valid))}."
    return ConfigError(f"unknown config key '{key}' for {where}.{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (often a string from the command line) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp), key)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(str, typing.get_args(tp)))}")
        return value
    if origin in (tuple, list):
        return _coerce_sequence(value, origin, typing.get_args(tp), key)
    if origin is dict or tp is dict:
        return _coerce_mapping(value, typing.get_args(tp), key)
    if tp is bool:
        return _coerce_bool(value, key)
    if tp in (int, float):
        return _coerce_number(value, tp, key)
    if tp is str:
        return str(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping for {tp.__name__}")
        return build(tp, value, where=key)
    return value


def _coerce_union(value: Any, args: tuple[Any, ...], key: str) -> Any:
    """``X | None`` and other unions: None where allowed, else the first member that accepts it."""
    is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))
    if is_none and type(None) in args:
        return None
    errors = []
    for a in args:
        if a is type(None):
            continue
        try:
            return _coerce(value, a, key)
        except ConfigError as exc:
            errors.append(str(exc))
    raise ConfigError(errors[0] if errors else f"config key '{key}': cannot use {value!r}")


def _coerce_sequence(value: Any, origin: Any, args: tuple[Any, ...], key: str) -> Any:
    """``a,b,c`` or a list -> tuple/list of the element type (blank items dropped)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [i.strip() if isinstance(i, str) else i for i in items if not (isinstance(i, str) and not i.strip())]
    out = [_coerce(i, args[0] if args else str, key) for i in items]
    return tuple(out) if origin is tuple else out


def split_pairs(text: str) -> list[str]:
    """``de=0.7,be=0.3`` -> its pairs; a comma starts a new pair only before ``KEY=``, so a pair's value
    can be a list (``widths=48,96,192,dropout=0.2`` -> two pairs)."""
    return [p for p in re.split(r",(?=\s*[\w.-]+\s*=)", text) if p.strip()]


def plain_value(text: str) -> Any:
    """A command-line string as the plain value it spells, for keys of no declared type (``model_kwargs``):
    ``2`` -> 2, ``0.3`` -> 0.3, ``true`` -> True, ``48,96,192`` or ``[48,96,192]`` -> a list; else the string."""
    text = text.strip()
    if "," in text or (text.startswith("[") and text.endswith("]")):
        return [plain_value(t) for t in text.removeprefix("[").removesuffix("]").split(",") if t.strip()]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return text


def _coerce_mapping(value: Any, args: tuple[Any, ...], key: str) -> dict[str, Any]:
    """``de=0.7,be=0.3`` or a mapping -> dict of the value type (plain values where the type is Any)."""
    if isinstance(value, str):
        pairs = [p.split("=", 1) for p in split_pairs(value)]
        value = {k.strip(): v.strip() for k, v in pairs}
    vt = args[1] if len(args) == 2 else Any
    if vt is Any:
        return {str(k): plain_value(v) if isinstance(v, str) else v for k, v in value.items()}
    return {str(k): _coerce(v, vt, key) for k, v in value.items()}


def _coerce_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")


def _coerce_number(value: Any, tp: type, key: str) -> int | float:
    try:
        if tp is int and not isinstance(value, bool):
            as_float = float(value)
            if as_float.is_integer():
                return int(as_float)  # accepts "2000", "2e3", 2000
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {value!r}") from None


def build(cls: type[C], data: dict[str, Any], where: str | None = None) -> C:
    """Build ``cls`` from a (possibly nested) mapping, coercing types and rejecting unknown keys."""
    where = where or cls.__name__
    fields = _fields(cls)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key = key.replace("-", "_")
        if key not in fields:
            raise _unknown(key, list(fields), where)
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where != cls.__name__ else key)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["lr=0.1", "data.size=48"]`` -> nested dict; values stay strings until coerced."""
    out: dict[str, Any] = {}
    for item in overrides:
        item = item.removeprefix("--")
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, value = item.split("=", 1)
        node = out
        parts = key.replace("-", "_").split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(cls: type[C], path: str | None = None, overrides: list[str] | None = None,
         base: dict[str, Any] | None = None) -> C:
    """Config from defaults < ``base`` < YAML file < overrides."""
    data: dict[str, Any] = dict(base or {})
    if path:
        from signscale import storage

        try:
            loaded = yaml.safe_load(storage.read_text(path)) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        data = _deep_merge(data, loaded)
    data = _deep_merge(data, parse_overrides(overrides or []))
    return build(cls, data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain data (for JSON/YAML, manifests and checkpoints)."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v) if not f.name.startswith("_")}
        if isinstance(v, (tuple, list)):
            return [conv(i) for i in v]
        if isinstance(v, dict):
            return {k: conv(i) for k, i in v.items()}
        return v
    return conv(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Describing a config class: what ``--help`` and the docs print for each key


# The sections ``--help`` shows keys in. A dataclass field may name its own with
# ``field(metadata={"group": ...})``; otherwise its name (or the name of the nested config it is
# in) picks one here, and anything else is listed under "other" rather than guessed.
GROUPS: dict[str, frozenset[str]] = {
    "data": frozenset({"data", "val", "source", "weights", "country_weights", "merge_by", "workers", "block_size",
                       "augment", "encoding", "image_size", "crop", "shard_mb", "dedup", "shuffle", "shuffle_seed",
                       "max_pixels", "tile", "flip", "classes", "inbox", "dataset", "golden", "slices",
                       "never_regress", "canary", "replay", "replay_split", "chunk", "near_dup_bits",
                       "max_quarantine", "corruptions", "severities", "examples", "gtsrb", "synthetic_train",
                       "synthetic_eval", "held_out", "samples", "val_samples", "strict", "name"}),
    "model": frozenset({"model", "model_kwargs", "init_from", "backbone", "fpn_channels", "head_convs",
                        "freeze_stages", "detector", "top_k", "detect_threshold", "backend"}),
    "optimisation": frozenset({"epochs", "max_steps", "batch_size", "accumulate", "optimizer", "lr", "weight_decay",
                               "momentum", "schedule", "warmup_frac", "warmup_steps", "label_smoothing",
                               "class_balance", "ema", "swa_from", "mixup", "cutmix", "clip_norm", "seed", "steps",
                               "from_scratch", "train",
                               "max_minutes", "detection_steps"}),
    "precision": frozenset({"precision", "channels_last", "compile", "device", "threads"}),
    "distributed": frozenset({"world_invariant", "rank", "world_size"}),
    "output": frozenset({"out", "checkpoint_every", "keep_last", "resume", "log_every", "progress", "work",
                         "log_level", "exist_ok"}),
    "service": frozenset({"host", "port", "batching", "max_batch", "max_wait_ms", "max_queue", "max_body_bytes",
                          "max_images", "max_request_pixels", "decode_budget_s", "request_timeout_s",
                          "read_timeout_s", "retry_after_s", "reload_interval_s"}),
}

# What a key means when its dataclass leaves it uncommented (the names every config shares).
_COMMON_HELP = {
    "model": "architecture name (small_cnn, msnet, stn_msnet, resnet18_small)",
    "model_kwargs": "keywords of the architecture (signscale.models.cnn), e.g. widths=48,96,192,contrast=local",
    "epochs": "passes over the training data",
    "optimizer": "adamw or sgd",
    "lr": "peak learning rate",
    "weight_decay": "decoupled weight decay",
    "momentum": "SGD momentum",
    "schedule": "learning-rate schedule",
    "warmup_frac": "fraction of the steps spent warming the learning rate up",
    "warmup_steps": "steps spent warming the learning rate up",
    "label_smoothing": "cross-entropy label smoothing",
    "clip_norm": "gradient-norm clipping (0: none)",
    "precision": "fp32, or bf16/fp16 autocast (fp16 with a gradient scaler)",
    "channels_last": "NHWC memory format (faster convolutions on GPUs and recent CPUs)",
    "compile": "torch.compile the model",
    "workers": "loader worker processes (0: load in this process)",
    "seed": "random seed",
    "block_size": "samples per shuffle block of the streaming loader",
    "keep_last": "checkpoints kept (older ones are deleted)",
    "log_every": "steps between metric lines",
    "progress": "show a progress bar",
    "threads": "torch intra-op threads (0: torch's default)",
    "host": "interface to listen on (0.0.0.0: all)",
    "top_k": "classes returned per image",
    "retry_after_s": "Retry-After seconds sent with a 503",
    "backend": "auto, torch or onnx",
    "device": "auto | cpu | cuda",
    "batch_size": "samples per batch",
}


@dataclasses.dataclass(frozen=True)
class Key:
    """One settable key of a config class, as ``--help`` shows it."""

    name: str  # dotted for nested configs: augment.flip
    type: str  # readable: int, float, bool, str, {fp32,bf16,fp16}, int,int, KEY=VALUE,...
    default: Any  # dataclasses.MISSING when the key is required
    help: str  # the field's comment or docstring, one line
    group: str
    mapping: bool = False  # a dict: given as KEY=VALUE pairs, or one at a time as name.KEY=VALUE

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


def _comments(cls: type) -> dict[str, str]:
    """Each field's comment (trailing, on the lines above, or a string just below), from the source.

    The dataclasses document their keys with comments, which is what a reader of the code sees;
    reading them here keeps ``--help`` and the code from drifting apart.
    """
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, line holds only the comment)
    lines = src.splitlines()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                row = tok.start[0]
                comments[row] = (tok.string[1:], not lines[row - 1][:tok.start[1]].strip())
    except (tokenize.TokenError, IndentationError):
        return {}
    body = ast.parse(src).body[0].body  # type: ignore[attr-defined]
    out: dict[str, str] = {}
    for i, node in enumerate(body):
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        parts: list[str] = []
        above: list[str] = []
        row = node.lineno - 1
        while row in comments and comments[row][1] and not comments[row][0].startswith("  "):
            above.insert(0, comments[row][0].strip())
            row -= 1
        parts.extend(above)
        end = node.end_lineno or node.lineno
        if end in comments and not comments[end][1]:
            parts.append(comments[end][0].strip())
            row = end + 1
            while row in comments and comments[row][1] and comments[row][0].startswith("  "):
                parts.append(comments[row][0].strip())  # an indented continuation of the trailing comment
                row += 1
        nxt = body[i + 1] if i + 1 < len(body) else None
        if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                and isinstance(nxt.value.value, str):
            parts.append(" ".join(nxt.value.value.split()))
        out[node.target.id] = " ".join(p for p in parts if p)
    return out


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return "|".join(names) + ("|none" if type(None) in args else "")
    if origin is typing.Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"{_type_name(args[0])},..."
        return ",".join(_type_name(a) for a in args) if args else "list"
    if origin is list:
        return f"{_type_name(args[0]) if args else 'str'},..."
    if origin is dict or tp is dict:
        return "KEY=VALUE,..."
    if tp is Any:
        return "value"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _group_of(name: str, f: dataclasses.Field) -> str:
    if "group" in f.metadata:
        return str(f.metadata["group"])
    for group, names in GROUPS.items():
        if name in names:
            return group
    return "other"


def keys(cls: type, prefix: str = "", group: str = "") -> list[Key]:
    """Every settable key of ``cls`` (nested configs flattened to ``outer.inner``), in field order."""
    hints = typing.get_type_hints(cls)
    notes: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        notes.update(_comments(klass))
    out: list[Key] = []
    for name, f in _fields(cls).items():
        tp = hints[name]
        g = group or _group_of(name, f)
        if dataclasses.is_dataclass(tp):
            out.extend(keys(tp, prefix=f"{prefix}{name}.", group=g))  # type: ignore[arg-type]
            continue
        mapping = typing.get_origin(tp) is dict or tp is dict
        out.append(Key(name=prefix + name, type=_type_name(tp), default=_default(f),
                       help=notes.get(name, "") or _COMMON_HELP.get(name, ""),
                       group=g, mapping=mapping))
    return out


def show_value(value: Any) -> str:
    """A default as a user would type it on the command line."""
    if value is dataclasses.MISSING:
        return "required"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(show_value(v) for v in value) or "empty"
    if isinstance(value, dict):
        return ",".join(f"{k}={show_value(v)}" for k, v in value.items()) or "empty"
    if value == "":
        return '""'
    return str(value)


# Keys renamed since a release, old (without dashes or underscores) -> new: the did-you-mean names the new one.
RENAMED = {"size": "image_size"}


def closest(name: str, valid: list[str]) -> str | None:
    """The valid name a typo most likely meant (dashes, underscores and case ignored), or None."""
    def norm(s: str) -> str:
        return s.lstrip("-").replace("-", "").replace("_", "").lower()

    by_norm = {norm(v): v for v in valid}
    if norm(name) in by_norm:
        return by_norm[norm(name)]
    if norm(RENAMED.get(norm(name), "")) in by_norm:  # an old name finds its new one before any look-alike
        return by_norm[norm(RENAMED[norm(name)])]
    close = difflib.get_close_matches(norm(name), list(by_norm), n=1, cutoff=0.6)
    return by_norm[close[0]] if close else None
