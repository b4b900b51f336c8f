"""Checks of integer and number arguments, with messages that name the argument.

Configs call the ``*_fields`` forms from ``__post_init__`` with their field names; functions
call ``check_int`` / ``check_number`` on an argument. ``bool`` is never accepted as a number,
although Python counts it as an ``int``: ``k=True`` is a mistake, not ``k=1``.

What it leaves out: checks that relate several values (each config says those itself).
"""

from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    """Whether ``value`` is an ``int`` and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, *, minimum: int = 1, optional: bool = False) -> None:
    """Raise ValueError unless ``value`` is an integer >= ``minimum`` (or None, if ``optional``)."""
    if optional and value is None:
        return
    if not is_int(value) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {kind}{' or None' if optional else ''}, got {value!r}")


def check_number(name: str, value: Any, *, positive: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite number >= 0 (> 0 if ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf or (positive and value == 0):
        kind = "a finite positive number" if positive else "a finite number >= 0"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def check_int_fields(owner: object, *names: str, minimum: int = 1, optional: bool = False) -> None:
    """``check_int`` on each named field of ``owner``."""
    for name in names:
        check_int(name, getattr(owner, name), minimum=minimum, optional=optional)


def check_number_fields(owner: object, *names: str, positive: bool = False) -> None:
    """``check_number`` on each named field of ``owner``."""
    for name in names:
        check_number(name, getattr(owner, name), positive=positive)
