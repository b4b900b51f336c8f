"""The ReLU SAE baseline (Bricken et al. 2023; Anthropic's April 2024 update): an L1 penalty.

    acts  = ReLU(W_enc (x - b_dec) + b_enc)
    x_hat = acts @ W_dec + b_dec
    loss  = ||x - x_hat||^2 + l1_coefficient * sum_i acts_i ||W_dec[i]||

Plain dense PyTorch: the code has no fixed k, so it is a ``[batch, d_sae]`` tensor
(``ForwardOutput.acts``) and the encoder/decoder are ordinary matrix products.
The decoder-norm weighting makes the penalty independent of how the scale is split between
code and dictionary; with the trainer's unit-norm decoder the weights are 1 but the term
still pushes on the decoder norms, whose parallel gradient the trainer removes.

Training terms: reconstruction and ``l1`` (``losses.weighted_l1`` weighted by ``l1_coefficient``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import ForwardOutput, register_architecture
from .baseline import DenseCodeSAE, L1Config, l1_term


@dataclass(kw_only=True)
class ReLUSAEConfig(L1Config):
    """Shape and L1 coefficient of a ReLU (L1) SAE."""


@register_architecture
class ReLUSAE(DenseCodeSAE):
    """ReLU SAE trained with a decoder-norm-weighted L1 penalty. Dense PyTorch."""

    architecture = "relu"
    config_class = ReLUSAEConfig

    def __init__(self, cfg: ReLUSAEConfig) -> None:
        super().__init__(cfg)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **self.factory))  # [d_sae]
        self.setup_hooks()

    def encode_batch(self, x: Tensor) -> tuple[Tensor, None]:
        return torch.relu(self.pre_acts(x) + self.b_enc), None  # [batch, d_sae]

    def training_terms(self, x: Tensor, out: ForwardOutput, dead: Tensor | None = None) -> dict[str, Tensor]:
        """Reconstruction and the L1 penalty (``l1``)."""
        terms = super().training_terms(x, out, dead)
        terms["l1"] = l1_term(self.cfg, x, out.acts.reshape(-1, self.d_sae), self.W_dec)
        return terms
