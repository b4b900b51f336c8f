"""The ``switch-sae`` command (also ``python -m switch_sae``).

``commands`` holds the subcommands and the entry point; ``args`` derives their options
from the config dataclasses, so ``--help`` is the documentation.
"""

from .commands import EXIT_INTERRUPTED, EXIT_USAGE, build_parser, main

__all__ = ["EXIT_INTERRUPTED", "EXIT_USAGE", "build_parser", "main"]
