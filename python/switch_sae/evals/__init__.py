"""Evaluating SAEs: reconstruction, sparsity, routing, and loss recovered in the model.

``evaluate(sae, model, tokens, hook_name) -> EvalResult`` is the entry point, and
``evaluate_many(saes, ...)`` scores several SAEs sharing the model's own passes; ``metrics``
(reconstruction and sparsity), ``dead`` (dead against unseen latents), ``patching`` (loss
recovered, KL) and ``experts`` (router statistics) are its parts. Feature geometry, FLOP
accounting and plots are separate modules of this package.
"""

from .evaluate import EvalResult, evaluate, evaluate_many, mean_activation
from .metrics import ReconstructionMetrics, ReconstructionResult
from .patching import PatchingMetrics, PatchingResult

__all__ = [
    "EvalResult",
    "PatchingMetrics",
    "PatchingResult",
    "ReconstructionMetrics",
    "ReconstructionResult",
    "evaluate",
    "evaluate_many",
    "mean_activation",
]

# Feature geometry, router statistics, FLOP accounting, plots and the analyze report.
from .experts import ExpertStats, ExpertStatsAccumulator, expert_stats
from .flops import (
    FlopCount, SAEShape, flop_count, flop_matched_config, make_saes, matched_configs, parameter_count, training_flops, width_matched_config,
)
from .geometry import (
    DuplicateGroup, NearestNeighbours, duplicate_fraction, duplicate_groups, expert_similarity, nearest_neighbours,
    random_block_similarity, tsne_embedding,
)
from .report import analyze_runs

__all__ += [
    "DuplicateGroup",
    "ExpertStats",
    "ExpertStatsAccumulator",
    "FlopCount",
    "NearestNeighbours",
    "SAEShape",
    "analyze_runs",
    "duplicate_fraction",
    "duplicate_groups",
    "expert_similarity",
    "expert_stats",
    "flop_count",
    "flop_matched_config",
    "make_saes",
    "matched_configs",
    "nearest_neighbours",
    "parameter_count",
    "random_block_similarity",
    "training_flops",
    "tsne_embedding",
    "width_matched_config",
]
