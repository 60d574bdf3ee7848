"""Typed YAML: plain nested data (a loaded YAML file) converted strictly into frozen dataclasses.

Generic, knows no section: trainer/config.py declares the tree, this module checks values against
its type hints. Every error is a ConfigError naming the dotted path of the bad key or value.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Union


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names its dotted path."""


def positive(obj: Any, path: str, *names: str) -> None:
    """Each named field of a section is > 0."""
    for name in names:
        value = getattr(obj, name)
        if value <= 0:
            raise ConfigError(f"{path}.{name} must be > 0, got {value!r}")


def choice(obj: Any, path: str, name: str, allowed: tuple[str, ...]) -> None:
    """A field holds one of the allowed strings."""
    value = getattr(obj, name)
    if value not in allowed:
        raise ConfigError(f"{path}.{name} must be one of {list(allowed)}, got {value!r}")


def auto_or(obj: Any, path: str, name: str, what: str, valid=lambda v: True) -> None:
    """A field that holds the word "auto" (resolved later) or a value `valid` accepts, `what` naming it."""
    value = getattr(obj, name)
    if (value != "auto") if isinstance(value, str) else not valid(value):
        raise ConfigError(f"{path}.{name} must be {what} or 'auto', got {value!r}")


# A YAML 1.1 float PyYAML leaves as text (1e-3 has no dot, so it is not a float there).
_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def convert(value: Any, tp: Any, path: str) -> Any:
    """`value` as type `tp` (int, float, bool, str, X | None, tuple[X, ...] or a dataclass), never coerced
    across kinds: a bool is not an int, a string is a number only when written as one."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        item = typing.get_args(tp)[0]  # tuple[X, ...]: the length is the section's to check
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return tuple(convert(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML (YAML 1.1) reads 1e-3 as a string; a number written that way is still a number.
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    raise ConfigError(f"{path}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: Any, path: str) -> Any:
    """Dataclass `cls` from a mapping; an unknown key, a wrong type or a failed check is a ConfigError at `path`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"unknown key {where} (known: {', '.join(sorted(names))})")
    kwargs = {k: convert(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # pccnet's own checks name "Class.field"; say where it sits in the tree
        message = str(e)
        if message.startswith(f"{cls.__name__}."):
            raise ConfigError(f"{path}.{message[len(cls.__name__) + 1:]}") from e
        raise ConfigError(f"{path}: {message}") from e


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (YAML-safe: tuples become lists) of a config dataclass."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    return plain(dataclasses.asdict(cfg))


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
