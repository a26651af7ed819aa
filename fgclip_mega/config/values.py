"""Field values from text: YAML/CLI values coerced to a dataclass field's declared type, dotted
`key.sub=value` overrides, and the type check of a whole tree; every error names the field.
Generic over dataclasses (the package's __init__ holds the Config tree).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field."""


def _field_types(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Converts a YAML/CLI value to the declared field type, or raises naming the field."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (types.UnionType, typing.Union):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{name}: {value!r} matches none of {tp}")
    if origin is list:
        # YAML/CLI give a list ([jsonl, wandb]); a string is split at commas (jsonl,wandb).
        items = value
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{name}[{i}]") for i, v in enumerate(items)]
    if tp is type(None):
        if value is None or value in ("null", "None"):
            return None
        raise ConfigError(f"{name}: expected null, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected an int, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{name}: expected a float, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{name}: must be finite, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    raise ConfigError(f"{name}: unsupported field type {tp}")


def check_types(node: Any, prefix: str) -> None:
    """Every field of the dataclass tree `node` holds a value of its declared type."""
    for f in dataclasses.fields(node):
        name = f"{prefix}{f.name}"
        value = getattr(node, f.name)
        tp = _field_types(node)[f.name]
        if dataclasses.is_dataclass(tp):
            check_types(value, name + ".")
        else:
            _coerce(value, tp, name)


def _lookup(cfg: Any, dotted: str) -> tuple[Any, str, Any]:
    """Returns (parent dataclass, field name, declared type) for a dotted key."""
    parts = dotted.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"{'.'.join(parts[:i])}: is a value, it has no field {part!r}")
        names = {f.name for f in dataclasses.fields(node)}
        if part not in names:
            where = ".".join(parts[:i]) or "<root>"
            raise ConfigError(
                f"{dotted}: unknown key {part!r} in {where}; valid keys: {sorted(names)}"
            )
        if i == len(parts) - 1:
            return node, part, _field_types(node)[part]
        node = getattr(node, part)
    raise AssertionError("unreachable")


def set_value(cfg: Any, dotted: str, value: Any) -> None:
    parent, name, tp = _lookup(cfg, dotted)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted}: is a section; give a mapping, got {value!r}")
        for key, sub in value.items():
            set_value(cfg, f"{dotted}.{key}", sub)
        return
    setattr(parent, name, _coerce(value, tp, dotted))


def apply_dict(cfg: Any, values: dict[str, Any], prefix: str = "") -> Any:
    for key, value in values.items():
        set_value(cfg, f"{prefix}{key}", value)
    return cfg


def apply_cli(cfg: Any, pairs: list[str]) -> Any:
    import yaml

    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r}: expected key.sub=value")
        key, raw = pair.split("=", 1)
        # YAML parsing gives 1e-4 -> float, true -> bool, [..] -> list, like the YAML file does.
        value = yaml.safe_load(raw) if raw != "" else ""
        set_value(cfg, key.strip(), value)
    return cfg
