"""The Switch SAE (Mudide et al. 2024) with optional multi-expert activation (Scale SAE).

    probs = softmax((x - b_router) @ W_router.T);  experts, gates = top-n_active(probs)
    code  = TopK_k( union over selected e of  gate_e * ReLU(TopK_k(W_enc[e] (x - b_dec) + b_enc[e])) )
    x_hat = sum_j code.values[j] * W_dec_flat[code.indices[j]] + b_dec

One forward pass of ``x [batch, d_in]``, stage by stage (the stages live in ``routed.py``):

    route     probs [batch, n_experts]; experts, gates [batch, n_active]     (``route`` below)
    dispatch  the rows = batch * n_active (token, expert) pairs grouped by expert: ``Grouped``
              (tokens [batch, d_in], order [rows], offsets [n_experts + 1])
    exchange  ``Grouped`` to the process owning each expert and codes back (``self.exchange``;
              the identity on one process)
    encode    values, indices [rows, k]: each pair's TopK over its expert's d_expert features
    combine   values * gate; each token's n_active * k candidates merged into its top k: [batch, k]
    decode    x_hat [batch, d_in] = gather-sum of k decoder rows + b_dec

Only a token's own experts' encoder rows are multiplied (``ops.encode_topk``), so the
encoder costs ``n_active * d_expert`` rather than ``d_sae`` multiply-adds per token per input
dimension, and no ``[batch, d_sae]`` tensor is ever built.
The gate is the router's (not renormalised) probability: with one active expert it is
``p_max``, which is how the router learns from the reconstruction loss (paper, sec. 3);
``gate="renormalized"`` divides it by the sum over the selected experts (Scale SAE).

Optional feature scaling (Scale SAE, arXiv 2511.05745): each expert's encoder is
``A_LP + (1 + w_e) A_HP`` with ``A_LP = T(mean row of W_enc[e])`` broadcast over rows and
``A_HP = W_enc[e] - A_LP``; ``T`` (d_in x d_in, shared) starts at the identity, ``w_e`` at 0.

What it leaves out: losses and the training recipe (``switch_sae.training``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import reference
from ..utils.checks import check_int_fields, check_number
from . import losses
from .auxk import AuxKConfig, AuxKTerms
from .base import ForwardOutput, HookPoint, SAEConfig, SparseCode, parse_dtype, register_architecture
from .routed import RoutedSAE, encode_routed


@dataclass(kw_only=True)
class SwitchSAEConfig(AuxKConfig, SAEConfig):
    """Shape and options of a Switch SAE. ``d_sae = n_experts * d_expert``."""

    n_experts: int
    """Number of expert SAEs the router chooses from."""
    d_expert: int
    """Features per expert."""
    k: int
    """Active features per token (the L0 of the code)."""
    n_active: int = 1
    """Experts per token: 1 is the paper's Switch SAE, >1 multi-expert activation."""
    gate: str = "prob"
    """Scale of a selected expert's values: 'prob', its router probability (the paper; the router learns from reconstruction), or 'renormalized', that divided by the sum over the token's n_active experts (Scale SAE; with n_active=1 the gate is 1 and only the balance loss trains the router)."""
    use_encoder_bias: bool = False
    """Per-feature encoder bias ``b_enc``; off in the paper's final Switch SAE."""
    feature_scaling: bool = False
    """Scale SAE feature scaling of the encoder (low-pass/high-pass split per expert)."""
    tile_rows: int = 1024
    """Tokens encoded at once per expert: bounds pre-activation memory to tile_rows x d_expert."""
    lb_coefficient: float = 0.3
    """Weight of the load-balancing loss ``n_experts * sum_i f_i P_i`` (1 when balanced) relative to the normalised reconstruction loss: the term is lb_coefficient * total_variance(x) * that statistic, so a collapsed router costs as much as lb_coefficient * (n_experts - 1) of unexplained variance. 0.3 kept the router balanced (statistic <= 1.01) and decisive (mean p_max > 0.9) on clustered synthetic data (benchmarks/synthetic_compare.py). 0 turns it off."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int_fields(self, "n_experts", "d_expert", "k", "n_active", "tile_rows")
        if self.k > self.d_expert:
            raise ValueError(
                f"k={self.k} is larger than an expert (d_expert={self.d_expert}): each expert "
                "must be able to supply k active features; lower k or widen the experts"
            )
        if self.n_active > self.n_experts:
            raise ValueError(f"n_active={self.n_active} exceeds n_experts={self.n_experts}")
        if self.gate not in reference.GATES:
            raise ValueError(f"gate must be one of {reference.GATES}, got {self.gate!r}")
        check_number("lb_coefficient", self.lb_coefficient)
        self.check_auxk(reachable=self.n_active * self.d_expert)

    @property
    def d_sae(self) -> int:
        return self.n_experts * self.d_expert


@register_architecture
class SwitchSAE(AuxKTerms, RoutedSAE):
    """Switch SAE: a router sends each token to ``n_active`` of ``n_experts`` TopK SAEs."""

    architecture = "switch"
    config_class = SwitchSAEConfig

    def __init__(self, cfg: SwitchSAEConfig) -> None:
        super().__init__(cfg)
        factory = {"dtype": parse_dtype(cfg.dtype), "device": cfg.device}
        E, m, d = cfg.n_experts, cfg.d_expert, cfg.d_in
        # Encoder rows start parallel to the unit-norm decoder rows (paper, appendix A).
        W_dec = torch.randn(E, m, d, **factory)  # [n_experts, d_expert, d_in]
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.clone())  # [n_experts, d_expert, d_in]
        self.b_enc = nn.Parameter(torch.zeros(E, m, **factory)) if cfg.use_encoder_bias else None
        self.W_router = nn.Parameter(torch.randn(E, d, **factory) / d**0.5)  # [n_experts, d_in]
        self.b_router = nn.Parameter(torch.zeros(d, **factory))  # [d_in]
        self.b_dec = nn.Parameter(torch.zeros(d, **factory))  # [d_in] the pre-bias
        if cfg.feature_scaling:
            self.feature_T = nn.Parameter(torch.eye(d, **factory))  # [d_in, d_in]
            self.feature_w = nn.Parameter(torch.zeros(E, **factory))  # [n_experts]
        self.hook_router_probs = HookPoint()  # [batch, n_experts]
        self.setup_hooks()

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def W_dec_flat(self) -> Tensor:
        return self.W_dec.view(-1, self.cfg.d_in)  # [d_sae, d_in], or this process's experts' rows

    @property
    def encoder_width(self) -> float:
        """``n_active * d_expert``: the latents a token's encoder covers, as each expert is a
        TopK SAE of width ``d_expert``. Measured on clustered synthetic data (1500 steps of
        1024 tokens, 8 experts, k = 4, against a 512-feature TopK SAE at FVU 0.0029): FLOP-matched
        8 x 512 reached 0.0019 and width-matched 8 x 64 0.0037 with this law; a step sqrt(8)
        larger (a law on ``d_expert / n_experts``) gave 0.0013 and 0.0345, and twice this
        step left the width-matched SAE at 0.023."""
        return self.cfg.n_active * self.cfg.d_expert

    def encoder_weight(self) -> Tensor:
        """``[n_experts, d_expert, d_in]`` encoder actually used (feature scaling applied)."""
        if not self.cfg.feature_scaling:
            return self.W_enc
        low_pass = self.W_enc.mean(dim=1) @ self.feature_T.T  # [n_experts, d_in]
        w = self.feature_w.view(-1, 1, 1)
        # A_LP + (1 + w) (W - A_LP) = (1 + w) W - w A_LP
        return (1 + w) * self.W_enc - w * low_pass.unsqueeze(1)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [batch, d_in]`` -> probs ``[batch, n_experts]``, gates and experts ``[batch, n_active]``."""
        probs, gates, experts = reference.route(x, self.W_router, self.b_router, self.cfg.n_active, self.cfg.gate)
        return self.hook_router_probs(probs), gates.to(x.dtype), experts

    def encode_batch(self, x: Tensor, update_state: bool) -> tuple[SparseCode, dict[str, Tensor]]:
        """route -> dispatch -> exchange -> encode -> combine (``models.routed``) of ``x [batch, d_in]``."""
        cfg = self.cfg
        probs, gates, experts = self.route(x)
        code = encode_routed(
            x, self.encoder_weight(), self.b_enc, self.b_dec, gates, experts, cfg.k, cfg.tile_rows, self.exchange
        )
        return code, {"router_probs": probs, "experts": experts, "gates": gates}

    def training_terms(self, x: Tensor, out: ForwardOutput, dead: Tensor | None = None) -> dict[str, Tensor]:
        """Reconstruction, AuxK (``auxk``, once latents are dead) and load balancing (``lb``)."""
        terms = super().training_terms(x, out, dead)
        if self.cfg.lb_coefficient > 0:
            balance = losses.load_balancing(out.router_probs, out.experts)
            terms["lb"] = self.cfg.lb_coefficient * losses.weight_unit(x) * balance
        return terms
