"""Synthetic activations with known sparse ground-truth features and cluster structure.

Each of ``n_features`` unit directions in ``d_in`` dimensions belongs to one of
``n_clusters`` clusters and leans towards that cluster's centre (``cluster_weight``). A
token picks one cluster, then ``features_per_token`` distinct features of that cluster
(Zipf-distributed frequencies, so some features are rare), each with a positive magnitude:

    x = sum_j magnitude_j * feature[id_j] + noise_std * N(0, I)

Because a token only uses its cluster's features, and those share a direction, a router
can tell clusters apart and an expert can specialise in one: this is the regime where a
Switch SAE should shine. With more features than dimensions (2,000 in 64) the features
are in superposition, so only sparse coding recovers them; ``mean_max_cosine`` measures
how many a learnt dictionary found.

Everything is drawn from ``torch.Generator``s seeded from the config, so a config and a
seed give the same data on every run and machine (CPU).

What it leaves out: real model activations (the rest of ``switch_sae.activations``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..utils.checks import check_int, check_int_fields


@dataclass
class SyntheticConfig:
    """Shape of a synthetic activation distribution."""

    d_in: int = 64
    """Width of the activations."""
    n_features: int = 2000
    """Ground-truth feature directions (split evenly over the clusters, remainder to the first ones)."""
    n_clusters: int = 16
    """Clusters of features; a token draws all its features from one cluster."""
    features_per_token: int = 8
    """Active ground-truth features per token (the true L0)."""
    cluster_weight: float = 0.4
    """Share of a feature direction's squared norm along its cluster centre, in [0, 1)."""
    zipf_exponent: float = 0.5
    """Feature frequency within a cluster ~ rank^-zipf_exponent (0 = uniform)."""
    magnitude_min: float = 0.5
    """Active magnitudes are uniform in [magnitude_min, magnitude_max]."""
    magnitude_max: float = 1.5
    """Upper end of the active magnitudes."""
    noise_std: float = 0.01
    """Std of isotropic Gaussian noise added to every coordinate."""
    seed: int = 0
    """Seed of the feature directions (batches take their own seed)."""

    def __post_init__(self) -> None:
        check_int_fields(self, "d_in", "n_features", "n_clusters", "features_per_token")
        if self.n_clusters > self.n_features:
            raise ValueError(f"n_clusters={self.n_clusters} exceeds n_features={self.n_features}")
        smallest = self.n_features // self.n_clusters
        if self.features_per_token > smallest:
            raise ValueError(
                f"features_per_token={self.features_per_token} exceeds the smallest cluster "
                f"({smallest} features); lower it or use fewer clusters"
            )
        if not 0 <= self.cluster_weight < 1:
            raise ValueError(f"cluster_weight must be in [0, 1), got {self.cluster_weight!r}")
        if self.zipf_exponent < 0:
            raise ValueError(f"zipf_exponent must be >= 0, got {self.zipf_exponent!r}")
        if not 0 < self.magnitude_min <= self.magnitude_max:
            raise ValueError(
                f"need 0 < magnitude_min <= magnitude_max, got {self.magnitude_min!r}, {self.magnitude_max!r}"
            )
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std!r}")


class SyntheticBatch(NamedTuple):
    """Tokens with the ground truth that produced them."""

    x: Tensor  # [batch, d_in]
    feature_ids: Tensor  # [batch, features_per_token] int64 active ground-truth features
    magnitudes: Tensor  # [batch, features_per_token]
    clusters: Tensor  # [batch] int64 cluster of each token


class SyntheticActivations:
    """A seeded distribution of sparse, clustered activations; see the module docstring."""

    def __init__(self, cfg: SyntheticConfig | None = None) -> None:
        self.cfg = cfg = cfg or SyntheticConfig()
        gen = torch.Generator().manual_seed(cfg.seed)
        centres = _unit(torch.randn(cfg.n_clusters, cfg.d_in, generator=gen))  # [n_clusters, d_in]
        # Cluster c owns features c, c + n_clusters, ... so clusters differ in size by at most one.
        self.feature_cluster = torch.arange(cfg.n_features) % cfg.n_clusters  # [n_features]
        own = _unit(torch.randn(cfg.n_features, cfg.d_in, generator=gen))
        lean = cfg.cluster_weight**0.5 * centres[self.feature_cluster] + (1 - cfg.cluster_weight) ** 0.5 * own
        self.features = _unit(lean)  # [n_features, d_in]
        self.cluster_members = [  # per cluster, its feature ids in frequency order
            torch.nonzero(self.feature_cluster == c).flatten() for c in range(cfg.n_clusters)
        ]
        self._weights = [  # per cluster, Zipf sampling weights of its members
            torch.arange(1, len(m) + 1, dtype=torch.float64) ** -cfg.zipf_exponent for m in self.cluster_members
        ]

    def sample(self, batch: int, generator: torch.Generator | None = None) -> SyntheticBatch:
        """Draw ``batch`` tokens and their ground truth."""
        check_int("batch", batch)
        cfg = self.cfg
        clusters = torch.randint(cfg.n_clusters, (batch,), generator=generator)  # [batch]
        feature_ids = torch.empty(batch, cfg.features_per_token, dtype=torch.int64)
        for c in range(cfg.n_clusters):  # a loop over clusters, not tokens: n_clusters is small
            tokens = torch.nonzero(clusters == c).flatten()
            if tokens.numel() == 0:
                continue
            weights = self._weights[c].expand(tokens.numel(), -1)
            picks = torch.multinomial(weights, cfg.features_per_token, replacement=False, generator=generator)
            feature_ids[tokens] = self.cluster_members[c][picks]
        span = cfg.magnitude_max - cfg.magnitude_min
        magnitudes = cfg.magnitude_min + span * torch.rand(batch, cfg.features_per_token, generator=generator)
        x = torch.einsum("bj,bjd->bd", magnitudes, self.features[feature_ids])  # [batch, d_in]
        if cfg.noise_std > 0:
            x = x + cfg.noise_std * torch.randn(batch, cfg.d_in, generator=generator)
        return SyntheticBatch(x, feature_ids, magnitudes, clusters)

    def batches(self, batch_size: int, n_batches: int | None, seed: int = 1) -> Iterator[Tensor]:
        """``n_batches`` (None: endless) ``[batch_size, d_in]`` tensors; same seed, same stream."""
        gen = torch.Generator().manual_seed(seed)
        produced = 0
        while n_batches is None or produced < n_batches:
            yield self.sample(batch_size, gen).x
            produced += 1


def mean_max_cosine(dictionary: Tensor, features: Tensor) -> float:
    """Mean over ground-truth features of their best cosine with any dictionary row.

    Args:
        dictionary: ``[d_sae, d_in]`` learnt directions (e.g. ``sae.W_dec_flat``).
        features: ``[n_features, d_in]`` ground-truth directions.
    """
    if dictionary.dim() != 2 or features.dim() != 2 or dictionary.shape[1] != features.shape[1]:
        raise ValueError(
            f"dictionary [d_sae, d_in] and features [n_features, d_in] must share d_in, got "
            f"{tuple(dictionary.shape)} and {tuple(features.shape)}"
        )
    cosines = _unit(features.float()) @ _unit(dictionary.detach().float()).T  # [n_features, d_sae]
    return cosines.max(dim=1).values.mean().item()


def _unit(rows: Tensor) -> Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)
