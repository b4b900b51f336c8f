"""The TopK SAE baseline (Gao et al. 2024), on the same sparse custom ops as Switch.

    code  = TopK_k(ReLU(W_enc (x - b_dec) + b_enc))
    x_hat = sum_j code.values[j] * W_dec[code.indices[j]] + b_dec

A TopK SAE is a Switch SAE with one expert and no router: ``W_enc`` is passed to
``ops.encode_topk`` viewed as ``[1, d_sae, d_in]`` with every token routed to expert 0,
and decoding is ``ops.decode``. So it never builds ``[batch, d_sae]`` beyond one tile of
``tile_rows x d_sae`` pre-activations, and it is the fair dense-dictionary comparison.

Training terms: reconstruction plus Gao et al.'s AuxK dead-latent loss (``auxk.py``).
``DictionaryTopKSAE`` is what TopK and BatchTopK share: the single-expert encoder over one
flat dictionary, its bias, and the AuxK terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..utils.checks import check_int_fields
from .auxk import AuxKConfig, AuxKTerms
from .base import SparseCode, register_architecture
from .baseline import DictionaryConfig, DictionarySAE
from .routed import RoutedSAE, encode_routed, single_expert


@dataclass(kw_only=True)
class DictionaryTopKConfig(AuxKConfig, DictionaryConfig):
    """Fields of the TopK-family SAEs over one flat dictionary (TopK, BatchTopK)."""

    k: int
    """Active features per token (the L0 of the code); for BatchTopK, their mean over a training batch."""
    use_encoder_bias: bool = True
    """Per-feature encoder bias ``b_enc`` (Gao et al. use one)."""
    tile_rows: int = 1024
    """Tokens encoded at once: bounds pre-activation memory to tile_rows x d_sae."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int_fields(self, "k", "tile_rows")
        if self.k > self.d_sae:
            raise ValueError(f"k={self.k} is larger than the dictionary (d_sae={self.d_sae}); lower k")
        self.check_auxk(reachable=self.d_sae)


class DictionaryTopKSAE(AuxKTerms, RoutedSAE, DictionarySAE):
    """A TopK-family SAE over one flat dictionary: a Switch SAE with one expert and no router."""

    def __init__(self, cfg: DictionaryTopKConfig) -> None:
        super().__init__(cfg)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **self.factory)) if cfg.use_encoder_bias else None
        self.setup_hooks()

    def encoder_weight(self) -> Tensor:
        """``[1, d_sae, d_in]``: the dictionary as the single expert of ``ops.encode_topk``."""
        return self.W_enc.unsqueeze(0)

    def encoder_bias(self) -> Tensor | None:
        """``[1, d_sae]`` or None, matching ``encoder_weight``."""
        return None if self.b_enc is None else self.b_enc.unsqueeze(0)

    def encode_single_expert(self, x: Tensor, k: int) -> SparseCode:
        """dispatch -> encode (``models.routed``) of ``x [batch, d_in]``, every token to the one
        expert: the top ``k`` ReLU'd pre-activations of each token, ``[batch, k]``, descending."""
        experts = single_expert(x.shape[0], x.device)  # [batch, 1]
        return encode_routed(
            x, self.encoder_weight(), self.encoder_bias(), self.b_dec, None, experts, k, self.cfg.tile_rows, self.exchange
        )


@dataclass(kw_only=True)
class TopKSAEConfig(DictionaryTopKConfig):
    """Shape and options of a TopK SAE."""


@register_architecture
class TopKSAE(DictionaryTopKSAE):
    """TopK SAE: keep the k largest pre-activations of each token."""

    architecture = "topk"
    config_class = TopKSAEConfig

    def encode_batch(self, x: Tensor, update_state: bool) -> tuple[SparseCode, dict[str, Tensor]]:
        return self.encode_single_expert(x, self.cfg.k), {}
