"""Per-feature statistics gathered in one streaming pass, in memory independent of the token count.

``StreamingTopK`` keeps, for every feature, the ``n`` occurrences with the highest score
seen so far: ``[d_sae, n]`` scores and payloads, merged batch by batch. With the
activation as the score it gives the top-activating examples; with a uniform random
score it is a reservoir sample of the feature's firings (the ``n`` smallest random keys
form a uniform sample without replacement), from which quantile bands are cut at the end.

``FeatureRecorder`` feeds both from the firings of each batch (``token``, ``feature``,
``value`` triples with value > 0) and also counts firings, sums activations and fills a
per-feature histogram over fixed log-spaced bins. Memory: ``O(d_sae * (n_top + n_sample +
n_bins))``; a ``[tokens, d_sae]`` tensor is never formed.

What it leaves out: running the model and the SAE (``gather``) and presenting (``site``).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Activation histogram bins: 10 per decade from 1e-4 to 1e4, plus under- and overflow.
HIST_EDGES = torch.logspace(-4, 4, 81, dtype=torch.float64)
N_BINS = len(HIST_EDGES) + 1


class StreamingTopK:
    """For each of ``d_sae`` features, the ``n`` highest-scoring (score, token, value) seen."""

    def __init__(self, d_sae: int, n: int) -> None:
        if n < 1:
            raise ValueError(f"n must be a positive number of examples per feature, got {n}")
        self.n = n
        self.scores = torch.full((d_sae, n), float("-inf"))  # [d_sae, n] -inf where empty
        self.tokens = torch.full((d_sae, n), -1, dtype=torch.int64)  # [d_sae, n] global token position
        self.values = torch.zeros(d_sae, n)  # [d_sae, n] activation

    def update(self, features: Tensor, scores: Tensor, tokens: Tensor, values: Tensor) -> None:
        """Merge candidate occurrences (all ``[m]``) into the per-feature top ``n``."""
        if features.numel() == 0:
            return
        d_sae, n = self.scores.shape
        # Sort by feature, best score first within a feature, and keep each feature's first n.
        by_score = torch.argsort(scores, descending=True, stable=True)
        order = by_score[torch.argsort(features[by_score], stable=True)]
        f = features[order]
        counts = torch.bincount(f, minlength=d_sae)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(f.numel()) - starts[f]
        keep = rank < n
        order, f, rank = order[keep], f[keep], rank[keep]
        new_scores = torch.full_like(self.scores, float("-inf"))
        new_scores[f, rank] = scores[order].float()
        new_tokens = torch.full_like(self.tokens, -1)
        new_tokens[f, rank] = tokens[order]
        new_values = torch.zeros_like(self.values)
        new_values[f, rank] = values[order].float()
        merged = torch.cat([self.scores, new_scores], dim=1)  # [d_sae, 2n]
        self.scores, best = merged.topk(n, dim=1)
        self.tokens = torch.cat([self.tokens, new_tokens], dim=1).gather(1, best)
        self.values = torch.cat([self.values, new_values], dim=1).gather(1, best)

    def examples(self, feature: int) -> tuple[Tensor, Tensor]:
        """``(tokens, values)`` kept for ``feature``, best score first, empty slots removed."""
        filled = self.tokens[feature] >= 0
        return self.tokens[feature][filled], self.values[feature][filled]


class FeatureRecorder:
    """Firing counts, activation sums, histograms, top examples and a random sample per feature."""

    def __init__(self, d_sae: int, n_top: int, n_sample: int, seed: int = 0) -> None:
        self.d_sae = d_sae
        self.n_tokens = 0
        self.fires = torch.zeros(d_sae, dtype=torch.int64)  # [d_sae]
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64)  # [d_sae]
        self.histogram = torch.zeros(d_sae * N_BINS, dtype=torch.int64)  # [d_sae * n_bins], flat for index_add_
        self.top = StreamingTopK(d_sae, n_top)
        self.sample = StreamingTopK(d_sae, n_sample)
        self.generator = torch.Generator().manual_seed(seed)

    def update(self, n_tokens: int, tokens: Tensor, features: Tensor, values: Tensor) -> None:
        """Record one batch of ``n_tokens`` tokens and its firings (``[m]`` each, values > 0)."""
        self.n_tokens += n_tokens
        features = features.long()
        self.fires += torch.bincount(features, minlength=self.d_sae)
        self.act_sum.index_add_(0, features, values.double())
        bins = torch.bucketize(values.double(), HIST_EDGES)
        self.histogram.index_add_(0, features * N_BINS + bins, torch.ones_like(bins))
        self.top.update(features, values, tokens, values)
        keys = torch.rand(features.numel(), generator=self.generator)
        self.sample.update(features, keys, tokens, values)

    @property
    def frequency(self) -> Tensor:
        """``[d_sae]`` fraction of tokens on which each feature fired."""
        return self.fires.double() / max(self.n_tokens, 1)

    @property
    def mean_activation(self) -> Tensor:
        """``[d_sae]`` mean activation over the tokens where the feature fired (0 if never)."""
        return self.act_sum / self.fires.clamp_min(1)

    def histograms(self) -> Tensor:
        """``[d_sae, n_bins]`` counts; bin ``i`` holds ``HIST_EDGES[i-1] < value <= HIST_EDGES[i]``."""
        return self.histogram.view(self.d_sae, N_BINS)
