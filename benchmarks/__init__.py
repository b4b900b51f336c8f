"""Benchmarks of switch_sae against the alternatives: validate, then time.

The one home of every benchmark, beside the package rather than inside it (as torchao
keeps them): ``python benchmarks/run.py`` and ``switch-sae bench`` (a thin entry point to
``parse_config`` and ``run_benchmarks`` here) run the timing suite, which writes
``latest.json``, ``summary.md`` and PNG plots; ``synthetic_compare``, ``geometry_synthetic``,
``step_memory`` and ``gpu_step`` are standalone studies. See ``README.md`` for what each
case measures and how.

What it leaves out: GPU cases at the paper's shapes (the runner records the CUDA device
but every case here runs on the CPU; ``gpu_step`` is the GPU check).
"""

from .config import QUICK, BenchConfig
from .measure import ValidationError, check_close
from .runner import main, parse_config, run, run_benchmarks

__all__ = ["QUICK", "BenchConfig", "ValidationError", "check_close", "main", "parse_config", "run", "run_benchmarks"]
