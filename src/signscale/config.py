"""YAML files and ``--key=value`` overrides into frozen dataclass configs.

Each module owns its config dataclass (``PackConfig`` in pack.py, ``TrainConfig`` in train.py);
this module only turns text into those objects, so library code never sees argparse or the
environment. Unknown keys are errors that name the closest valid key, because a typo in a
training config that is silently ignored costs a whole run.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names the key."""


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


def _unknown(key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(valid))}."
    return ConfigError(f"unknown config key '{key}' for {where}.{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (often a string from the command line) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
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
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin in (tuple, list):
        items = value.split(",") if isinstance(value, str) else list(value)
        items = [i.strip() if isinstance(i, str) else i for i in items if not (isinstance(i, str) and not i.strip())]
        inner = args[0] if args else str
        out = [_coerce(i, inner, key) for i in items]
        return tuple(out) if origin is tuple else out
    if origin is dict or tp is dict:
        if isinstance(value, str):
            # "de=0.7,be=0.3"
            pairs = [p.split("=", 1) for p in value.split(",") if p.strip()]
            value = {k.strip(): v.strip() for k, v in pairs}
        vt = args[1] if len(args) == 2 else Any
        return {str(k): (_coerce(v, vt, key) if vt is not Any else v) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if tp in (int, float):
        try:
            if tp is int and not isinstance(value, bool):
                as_float = float(value)
                if as_float.is_integer():
                    return int(as_float)  # accepts "2000", "2e3", 2000
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}': expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        return str(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping for {tp.__name__}")
        return build(tp, value, where=key)
    return value


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
        item = item[2:] if item.startswith("--") else item
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
