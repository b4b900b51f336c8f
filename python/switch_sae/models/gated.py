"""The Gated SAE baseline (Rajamanoharan et al. 2024, "Improving Dictionary Learning with
Gated Sparse Autoencoders").

    pi_gate = W_enc (x - b_dec) + b_gate              which features fire
    pi_mag  = exp(r_mag) * W_enc (x - b_dec) + b_mag  how strongly (encoder shared, rescaled)
    acts    = 1[pi_gate > 0] * ReLU(pi_mag);   x_hat = acts @ W_dec + b_dec
    loss    = ||x - x_hat||^2 + l1 * sum_i ReLU(pi_gate)_i ||W_dec[i]||
              + ||x - (ReLU(pi_gate) @ W_dec.detach() + b_dec.detach())||^2

The step ``1[pi_gate > 0]`` has no gradient; the gate path learns from the L1 term and the
auxiliary reconstruction through a frozen copy of the decoder, as in the paper.

Plain dense PyTorch: ``[batch, d_sae]`` activations (``ForwardOutput.acts``).

Training terms: reconstruction, ``l1`` on the gate path and ``gate_aux`` (the frozen-decoder
reconstruction), as above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import losses
from .base import ForwardOutput, register_architecture
from .baseline import DenseCodeSAE, L1Config, l1_term


@dataclass(kw_only=True)
class GatedSAEConfig(L1Config):
    """Shape and L1 coefficient of a Gated SAE."""


@register_architecture
class GatedSAE(DenseCodeSAE):
    """Gated SAE: a gate path picks features, a magnitude path sizes them. Dense PyTorch."""

    architecture = "gated"
    config_class = GatedSAEConfig

    def __init__(self, cfg: GatedSAEConfig) -> None:
        super().__init__(cfg)
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, **self.factory))  # [d_sae] log scale
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae, **self.factory))  # [d_sae]
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, **self.factory))  # [d_sae]
        self.setup_hooks()

    def encode_batch(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The magnitude path's values where the gate path is open; ``gate_acts`` for the losses."""
        pre = self.pre_acts(x)  # [batch, d_sae], shared by both paths
        pi_gate = pre + self.b_gate
        pi_mag = pre * torch.exp(self.r_mag) + self.b_mag
        acts = (pi_gate > 0).to(pre.dtype) * torch.relu(pi_mag)  # [batch, d_sae]
        return acts, {"gate_acts": torch.relu(pi_gate)}  # [batch, d_sae]

    def training_terms(self, x: Tensor, out: ForwardOutput, dead: Tensor | None = None) -> dict[str, Tensor]:
        """Reconstruction, ``l1`` on the gate path, and ``gate_aux``: the gate path's
        reconstruction through a frozen decoder, its only teacher besides the L1 term."""
        terms = super().training_terms(x, out, dead)
        gate_acts = out.aux["gate_acts"]
        terms["l1"] = l1_term(self.cfg, x, gate_acts, self.W_dec)
        terms["gate_aux"] = losses.mse(x, gate_acts @ self.W_dec.detach() + self.b_dec.detach())
        return terms
