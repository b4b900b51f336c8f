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

What it leaves out: the AuxK dead-latent loss (``switch_sae.training``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..utils.checks import check_int_fields
from .auxk import AuxKConfig, AuxKTerms
from .base import SparseCode, register_architecture
from .baseline import DictionaryConfig, DictionarySAE
from .routed import RoutedSAE, encode_routed, single_expert


@dataclass(kw_only=True)
class BatchTopKSAEConfig(AuxKConfig, DictionaryConfig):
    """Shape and options of a BatchTopK SAE."""

    k: int
    """Mean active features per token over a training batch."""
    use_encoder_bias: bool = True
    """Per-feature encoder bias ``b_enc``."""
    threshold_lr: float = 0.01
    """Rate of the moving average of the smallest kept activation (the inference threshold)."""
    tile_rows: int = 1024
    """Tokens encoded at once by ``ops.encode_topk``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int_fields(self, "k", "tile_rows")
        if self.k > self.d_sae:
            raise ValueError(f"k={self.k} is larger than the dictionary (d_sae={self.d_sae}); lower k")
        if not 0 < self.threshold_lr <= 1:
            raise ValueError(f"threshold_lr must be in (0, 1], got {self.threshold_lr!r}")
        self.check_auxk(reachable=self.d_sae)


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
class BatchTopKSAE(AuxKTerms, RoutedSAE, DictionarySAE):
    """BatchTopK SAE: batch-wide top k in training, a learnt threshold at inference."""

    architecture = "batchtopk"
    config_class = BatchTopKSAEConfig

    def __init__(self, cfg: BatchTopKSAEConfig) -> None:
        super().__init__(cfg)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **self.factory)) if cfg.use_encoder_bias else None
        # float64 so a long average of small updates does not stall; -1 means "not yet seen
        # a training batch", in which case inference falls back to the batch top k.
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float64, device=cfg.device))
        self.setup_hooks()

    def encoder_weight(self) -> Tensor:
        """``[1, d_sae, d_in]``: the dictionary as the single expert of ``ops.encode_topk``."""
        return self.W_enc.unsqueeze(0)

    def _sorted_acts(self, x: Tensor) -> SparseCode:
        """All ``[batch, d_sae]`` ReLU pre-activations per token, sorted descending."""
        b_enc = None if self.b_enc is None else self.b_enc.unsqueeze(0)
        experts = single_expert(x.shape[0], x.device)
        return encode_routed(
            x, self.encoder_weight(), b_enc, self.b_dec, None, experts, self.d_sae, self.cfg.tile_rows, self.exchange
        )

    def encode_batch(self, x: Tensor, update_state: bool) -> tuple[SparseCode, dict[str, Any]]:
        """The code of ``x [batch, d_in]``: the batch top k in training (or before any training
        batch), the learnt threshold at inference; ``update_state`` moves the threshold."""
        values, indices = self._sorted_acts(x)  # [batch, d_sae] each
        use_threshold = not self.training and self.threshold >= 0
        if use_threshold:
            counts = (values > self.threshold.to(values.dtype)).sum(-1)
            return keep_prefix(values, indices, counts), {}
        budget = min(self.cfg.k * values.shape[0], values.numel())
        kth = torch.topk(values.detach().flatten(), budget, sorted=False).values.min()
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
        if positive.numel():
            smallest = positive.min().to(torch.float64)
            if self.threshold < 0:
                self.threshold.copy_(smallest)
            else:
                self.threshold.lerp_(smallest, self.cfg.threshold_lr)
        return {"threshold": self.threshold.clone()}
