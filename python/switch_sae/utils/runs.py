"""Run folders: starting a new one, and checking that a resumed run keeps its options.

A run folder holds the config it was started with; resuming compares the saved config
with the one given now, so that a changed size is an error rather than a silently
different run. What it leaves out: what a run writes (its workflow's module).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


def require_empty(out: Path, hint: str) -> None:
    """Raise FileExistsError, ending with ``hint`` (the way out), if ``out`` holds anything."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"run folder {out} already exists and is not empty; {hint}")


def config_clashes(saved: Any, current: Any, *, ignore: tuple[str, ...] | set[str] = (),
                   defaults: Any = None) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved value, current value)}`` for every field of the config dataclass
    ``current`` that differs from ``saved``, apart from those in ``ignore`` (options that do
    not change the result). With ``defaults``, a field ``current`` leaves at its default is
    no clash: it was not set, so the saved value stands."""
    return {
        f.name: (getattr(saved, f.name), getattr(current, f.name))
        for f in dataclasses.fields(current)
        if f.name not in ignore and getattr(saved, f.name) != getattr(current, f.name)
        and (defaults is None or getattr(current, f.name) != getattr(defaults, f.name))
    }
