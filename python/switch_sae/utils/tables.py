"""Table cells: how the package prints values in its text and Markdown tables.

What it leaves out: each table's columns (the report that owns it).
"""

from __future__ import annotations

from typing import Any


def fmt(value: Any, spec: str = ".4g") -> str:
    """``value`` as a table cell: ``-`` for None, a float with ``spec``, anything else as ``str``."""
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)
