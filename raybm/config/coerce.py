"""Raw mappings (YAML, overrides) into typed config dataclasses: every key checked, with
an error that names the key and what it allows."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal

import yaml

from raybm.errors import ConfigError


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " (or empty)"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _yaml_value(text: str, key: str) -> Any:
    """A string value read as YAML (a list or mapping given as text)."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"{key}: {text!r} is not valid YAML ({str(e).splitlines()[0]})") from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type ``tp``, converting strings from CLI overrides."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping of keys), got {value!r}")
        return build_section(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none", "~")):
            return None
        return _coerce(value, args[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and "yes" in choices:  # YAML reads a bare yes / no as a boolean
            value = "yes" if value else "no"
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{key}: {value!r} is not valid; choose one of: {', '.join(map(str, choices))}.{hint}")
        return value
    if origin is list:
        if isinstance(value, str):
            parsed = _yaml_value(value, key)
            value = parsed if isinstance(parsed, list) else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            value = _yaml_value(value, key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float):
        what = "an integer" if tp is int else "a number"
        if isinstance(value, str):
            try:
                value = tp(value)
            except ValueError:
                pass
        if isinstance(value, float) and tp is int and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and isinstance(value, float)):
            raise ConfigError(f"{key}: expected {what}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return tp(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in this module


_SIGNS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _check_bounds(value: Any, bounds: dict[str, float], key: str) -> None:
    if value is None or not bounds:
        return
    ok = {"ge": lambda a, b: a >= b, "gt": lambda a, b: a > b, "le": lambda a, b: a <= b, "lt": lambda a, b: a < b}
    if not all(ok[op](value, limit) for op, limit in bounds.items()):
        valid = " and ".join(f"{_SIGNS[op]} {limit:g}" for op, limit in bounds.items())
        raise ConfigError(f"{key}: must be {valid}, got {value!r}")


def build_section(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """A config dataclass ``cls`` from its raw mapping; ``prefix`` is its dotted key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            full = f"{prefix}.{k}" if prefix else str(k)
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f" Did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(
                f"{full}: unknown key.{hint} Valid keys{' in ' + repr(prefix) if prefix else ''}: {', '.join(fields)}."
            )
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key = f"{prefix}.{name}" if prefix else name
        value = _coerce(raw[name], hints[name], key)
        _check_bounds(value, f.metadata.get("bounds", {}), key)
        kwargs[name] = value
    return cls(**kwargs)


def merge_raw(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge two raw config mappings (``extra`` wins)."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_raw(out[k], v)
        else:
            out[k] = v
    return out
