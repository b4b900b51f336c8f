"""Workflows that combine the pieces into whole experiments, each behind one command.

``demo``: the main job (``switch-sae demo``), TopK vs FLOP- and width-matched Switch SAEs,
with its table and report in ``demo_report``. ``reproduce``: the paper's sweeps over k and
n_experts behind ``switch-sae reproduce``.
"""

from .demo import DemoConfig, DemoResult, run_demo
from .reproduce import ReproduceConfig, ReproduceResult, run_reproduce

__all__ = ["DemoConfig", "DemoResult", "ReproduceConfig", "ReproduceResult", "run_demo", "run_reproduce"]
