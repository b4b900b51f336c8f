"""Rebuild a config dataclass from JSON, checking every field against its annotation.

A config read back from disk (``cfg.json``, a checkpoint's ``trainer.json``, a cache
manifest) may have been edited by hand or damaged. Passing it straight to the dataclass
would accept ``hook_name: 5`` or ``use_encoder_bias: "false"`` (a non-empty string is
true) and fail later with a misleading message, so each value is checked against the
field's type first, and every error names the file and the field.

What it leaves out: range checks and combinations of fields (each config's
``__post_init__`` does those).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from .io import DamagedFileError

T = TypeVar("T")


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a type annotation (bool is not an int here, int is a float)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list):  # JSON has only lists; tuples come back as lists
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def config_from_dict(cls: type[T], data: Any, source: str | Path) -> T:
    """``cls(**data)`` after checking names and types; errors name ``source`` and the field."""
    if not isinstance(data, dict):
        raise DamagedFileError(f"{source}: expected a JSON object for {cls.__name__}, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(data.keys() - fields.keys())
    if unknown:
        raise DamagedFileError(f"{source}: unknown {cls.__name__} field(s) {unknown}; known: {sorted(fields)}")
    missing = sorted(
        name for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise DamagedFileError(f"{source}: {cls.__name__} field(s) {missing} are missing")
    for name, value in data.items():
        if not _matches(value, hints[name]):
            raise DamagedFileError(
                f"{source}: field {name!r} must be {_type_name(hints[name])}, found {value!r} ({type(value).__name__})"
            )
    try:
        return cls(**data)
    except (ValueError, TypeError) as err:
        raise DamagedFileError(f"{source}: invalid {cls.__name__}: {err}") from err
