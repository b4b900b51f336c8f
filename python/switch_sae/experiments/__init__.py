"""Workflows that combine the pieces into the paper's experiments.

``reproduce``: the sweeps over k and n_experts behind ``switch-sae reproduce``.
"""

from .reproduce import ReproduceConfig, ReproduceResult, run_reproduce

__all__ = ["ReproduceConfig", "ReproduceResult", "run_reproduce"]
