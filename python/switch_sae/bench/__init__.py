"""Benchmarks of switch_sae against the alternatives: validate, then time.

``run_benchmarks(args)`` is what ``switch-sae bench`` and ``benchmarks/run.py`` call; it
returns the list of result records and writes ``latest.json``, ``summary.md`` and PNG
plots. See ``benchmarks/README.md`` for what each case measures and how.

What it leaves out: GPU cases at the paper's shapes (the runner records the CUDA device
but every case here runs on the CPU).
"""

from .config import QUICK, BenchConfig
from .measure import ValidationError, check_close
from .runner import add_arguments, main, run, run_benchmarks

__all__ = ["QUICK", "BenchConfig", "ValidationError", "add_arguments", "check_close", "main", "run", "run_benchmarks"]
