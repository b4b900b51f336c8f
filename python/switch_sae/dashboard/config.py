"""``DashboardConfig``: how many tokens the dashboard reads and how much of each feature it shows."""

from __future__ import annotations

from dataclasses import dataclass

from ..utils.checks import check_int_fields


@dataclass
class DashboardConfig:
    """What the feature dashboard gathers and shows."""

    tokens: int = 16_384
    """Held-out tokens read in the one pass over the model (rounded up to whole contexts)."""
    top_examples: int = 8
    """Top-activating contexts shown per feature."""
    bands: int = 5
    """Quantile bands of the feature's activations, each shown with a few sampled contexts."""
    band_examples: int = 2
    """Contexts shown per quantile band."""
    sample_size: int = 40
    """Firings sampled uniformly per feature (a streaming reservoir) to cut the quantile bands from."""
    left: int = 8
    """Tokens shown before the activating token."""
    right: int = 3
    """Tokens shown after the activating token."""
    logit_tokens: int = 10
    """Top and bottom vocabulary entries of the feature's logit effect."""
    neighbours: int = 6
    """Nearest features by decoder cosine shown per feature."""

    def __post_init__(self) -> None:
        check_int_fields(self, "tokens", "top_examples", "bands", "band_examples", "sample_size", "logit_tokens", "neighbours")
        check_int_fields(self, "left", "right", minimum=0)
        if self.sample_size < self.bands:
            raise ValueError(f"sample_size={self.sample_size} must be at least bands={self.bands} to fill every band")
