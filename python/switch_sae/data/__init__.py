"""Data sources for training and testing SAEs without a language model."""

from .synthetic import SyntheticActivations, SyntheticBatch, SyntheticConfig, mean_max_cosine

__all__ = ["SyntheticActivations", "SyntheticBatch", "SyntheticConfig", "mean_max_cosine"]
