"""What the five baseline SAEs share: one flat dictionary and its config fields.

Every baseline (TopK, BatchTopK, ReLU, Gated, JumpReLU) has ``W_enc [d_sae, d_in]``
(rows are encoder directions), ``W_dec [d_sae, d_in]`` (rows are unit-norm feature
directions, started parallel to the encoder rows as in the paper's appendix A) and the
pre-bias ``b_dec [d_in]``; their configs add ``d_sae`` to the fields of every SAE config.

What it leaves out: the hook points and the fields every SAE has (``base.py``), each
architecture's encoder nonlinearity, extra parameters and extra training terms (their own
files).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..utils.checks import check_int, check_number
from . import losses
from .base import SAE, ForwardOutput, SAEConfig, parse_dtype


@dataclass(kw_only=True)
class DictionaryConfig(SAEConfig):
    """Fields every baseline config has: those of every SAE, and the dictionary's width."""

    d_sae: int
    """Number of dictionary features."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("d_sae", self.d_sae)


@dataclass(kw_only=True)
class L1Config(DictionaryConfig):
    """A dictionary trained with the decoder-norm-weighted L1 penalty (ReLU and Gated SAEs)."""

    l1_coefficient: float = 1.0
    """Weight of ``sum_i |acts_i| ||W_dec[i]||`` for inputs normalised to E||x||^2 = d_in (scaled with the inputs' RMS otherwise)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("l1_coefficient", self.l1_coefficient)


def l1_term(cfg: L1Config, x: Tensor, acts: Tensor, W_dec: Tensor) -> Tensor:
    """The weighted L1 penalty of ``acts [batch, d_sae]`` computed from ``x [batch, d_in]``."""
    return cfg.l1_coefficient * losses.energy_unit(x).sqrt() * losses.weighted_l1(acts, W_dec)


class DictionarySAE(SAE):
    """Base of the baselines: a flat ``[d_sae, d_in]`` encoder and unit-norm decoder."""

    def __init__(self, cfg: DictionaryConfig) -> None:
        super().__init__(cfg)
        self.factory = {"dtype": parse_dtype(cfg.dtype), "device": cfg.device}
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, **self.factory)  # [d_sae, d_in]
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.clone())  # [d_sae, d_in]
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **self.factory))  # [d_in] the pre-bias

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def W_dec_flat(self) -> Tensor:
        return self.W_dec

    def pre_acts(self, x: Tensor) -> Tensor:
        """``x [batch, d_in]`` -> ``W_enc (x - b_dec)``, ``[batch, d_sae]`` (plain PyTorch)."""
        return (x - self.b_dec) @ self.W_enc.T


class DenseCodeSAE(DictionarySAE):
    """The L1 family (ReLU, Gated, JumpReLU): a dense ``[batch, d_sae]`` code from plain
    matrix products, decoded by ``acts @ W_dec + b_dec``.

    A subclass provides ``encode_batch(x)``: ``x [batch, d_in]`` -> ``acts [batch, d_sae]``
    and the ``aux`` inputs its ``training_terms`` needs (or None).
    """

    def encode_batch(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor] | None]:
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """``x [..., d_in]`` -> dense ``[..., d_sae]`` activations."""
        x, lead = self.check_input(x)
        return self.encode_batch(x)[0].view(*lead, self.d_sae)

    def encode_dense(self, x: Tensor) -> Tensor:
        return self.encode(x)

    def decode(self, acts: Tensor) -> Tensor:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> ForwardOutput:
        x, lead = self.check_input(x)
        x = self.hook_sae_input(x)  # [batch, d_in]
        acts, aux = self.encode_batch(x)
        acts = self.hook_sae_acts_post(acts)  # [batch, d_sae]
        x_hat = self.hook_sae_recons(self.decode(acts))
        return ForwardOutput(x_hat=x_hat.view(*lead, self.d_in), code=None, acts=acts.view(*lead, self.d_sae), aux=aux)
