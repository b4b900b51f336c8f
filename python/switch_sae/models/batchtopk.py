"""The BatchTopK SAE baseline (Bussmann et al. 2024): k active features per token on average.

Training keeps the ``k * batch`` largest ReLU pre-activations of the whole batch, so some
tokens use more than k features and some fewer. Inference cannot depend on the batch, so
the SAE keeps ``threshold``: an exponential moving average of the smallest activation kept
in each training batch (as SAELens does), and at inference keeps every activation above it
(a JumpReLU with one shared threshold).

Dense over the batch, on purpose: a batch-wide top k needs every pre-activation of every
token, so this baseline computes all ``[batch, d_sae]`` of them through ``ops.encode_topk``
with ``k = d_sae`` (one expert, rows sorted descending). Because each row is sorted, the
kept entries of a row are a prefix; the code is that prefix, padded with zeros to the
longest one in the batch, and decoding is the same sparse ``ops.decode`` as Switch.

What it leaves out: the single-expert encoder it shares with TopK (``topk.DictionaryTopKSAE``)
and the AuxK dead-latent loss (``auxk.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Any

import torch
from torch import Tensor

from . import batch_scope
from .base import SparseCode, register_architecture
from .topk import DictionaryTopKConfig, DictionaryTopKSAE


@dataclass(kw_only=True)
class BatchTopKSAEConfig(DictionaryTopKConfig):
    """Shape and options of a BatchTopK SAE."""

    threshold_lr: float = 0.01
    """Rate of the moving average of the smallest kept activation (the inference threshold)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.threshold_lr <= 1:
            raise ValueError(f"threshold_lr must be in (0, 1], got {self.threshold_lr!r}")


def keep_prefix(values: Tensor, indices: Tensor, counts: Tensor) -> SparseCode:
    """Keep the first ``counts[r]`` entries of each descending row; trim to the longest.

    Args:
        values, indices: ``[batch, d_sae]`` rows sorted by value, descending.
        counts: ``[batch]`` int64 entries to keep per row.
    Returns:
        ``SparseCode`` of width ``max(counts)`` (at least 1), dropped entries zeroed.
    """
    width = max(int(counts.max()), 1) if counts.numel() else 1
    keep = torch.arange(width, device=values.device) < counts.unsqueeze(-1)  # [batch, width]
    return SparseCode(values[:, :width] * keep, indices[:, :width].contiguous())


@register_architecture
class BatchTopKSAE(DictionaryTopKSAE):
    """BatchTopK SAE: batch-wide top k in training, a learnt threshold at inference."""

    architecture = "batchtopk"
    config_class = BatchTopKSAEConfig

    def __init__(self, cfg: BatchTopKSAEConfig) -> None:
        super().__init__(cfg)
        # float64 so a long average of small updates does not stall; -1 means "not yet seen
        # a training batch", in which case inference falls back to the batch top k.
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float64, device=cfg.device))

    def encode_batch(self, x: Tensor, update_state: bool) -> tuple[SparseCode, dict[str, Any]]:
        """The code of ``x [batch, d_in]``: the batch top k in training (or before any training
        batch), the learnt threshold at inference; ``update_state`` moves the threshold."""
        values, indices = self.encode_single_expert(x, self.d_sae)  # [batch, d_sae] each, sorted descending
        use_threshold = not self.training and self.threshold >= 0
        if use_threshold:
            counts = (values > self.threshold.to(values.dtype)).sum(-1)
            return keep_prefix(values, indices, counts), {}
        # The batch is every process's tokens when training is split across processes.
        scope = batch_scope.current()
        budget = min(self.cfg.k * scope.n_tokens(values.shape[0]), scope.n_tokens(values.shape[0]) * values.shape[1])
        kth = scope.largest(values.detach().flatten(), budget).min()
        # Ties at the k*batch-th value are kept whole: they are equal, so which one is immaterial.
        # Zeros (ReLU'd) are never kept: they add nothing and would only widen the code.
        counts = ((values.detach() >= kth) & (values.detach() > 0)).sum(-1)
        if not update_state:
            return keep_prefix(values, indices, counts), {}
        return keep_prefix(values, indices, counts), {"aux": self._update_threshold_(values.detach(), counts)}

    @torch.no_grad()
    def _update_threshold_(self, values: Tensor, counts: Tensor) -> dict[str, Tensor]:
        kept = torch.arange(values.shape[1], device=values.device) < counts.unsqueeze(-1)
        positive = values[kept & (values > 0)]
        scope = batch_scope.current()
        smallest = positive.min().to(torch.float64) if positive.numel() else torch.tensor(math.inf, dtype=torch.float64)
        smallest = scope.min(smallest.to(self.threshold.device))
        if math.isfinite(smallest):
            if self.threshold < 0:
                self.threshold.copy_(smallest)
            else:
                self.threshold.lerp_(smallest, self.cfg.threshold_lr)
        return {"threshold": self.threshold.clone()}
