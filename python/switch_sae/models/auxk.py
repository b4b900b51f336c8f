"""The dead-latent code for AuxK, computed with the model's own sparse encoder.

AuxK needs, per token, the top ``k_aux`` pre-activations among *dead* latents. A dense
implementation masks a ``[batch, d_sae]`` matrix; that is exactly what a Switch SAE must
never build. Instead we call the same routed ``ops.encode_topk`` once more with
``k = k_aux`` and an additive encoder bias that is 0 on dead latents and hugely negative
on live ones (plus the model's own ``b_enc``): live latents then lose every TopK
comparison against a dead one and come out of the ReLU as exactly 0, so they add nothing.
Cost: one more routed encoder pass, ``tile_rows x d_expert`` memory, as in the forward.

Which latents compete: those of each token's routed expert(s) only. For Switch SAEs the
values are multiplied by the token's router gate *detached*: the dead latents are
trained on the scale at which they would decode in the real forward pass (which includes
the gate), but the auxiliary loss does not move the router, whose only teachers stay the
reconstruction and the balance loss.

Weight (Gao et al., appendix A.2): ``auxk_coefficient = 1/32`` relative to the normalised
reconstruction loss, ``k_aux = d_in / 2``; the term is ``auxk_coefficient * total_variance(x)
* NMSE_aux``, so it sits on the scale of the reconstruction loss whatever the data's units.

What it leaves out: the loss arithmetic (``losses.auxk``) and deciding who is dead (the
trainer's ``DeadLatentTracker``, which passes its mask to ``training_terms``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..utils.checks import check_int, check_number
from . import losses
from .base import SAE, ForwardOutput, SparseCode
from .routed import encode_routed, single_expert


@dataclass(kw_only=True)
class AuxKConfig:
    """The AuxK fields of every TopK-family config (Switch, TopK, BatchTopK)."""

    auxk_coefficient: float = 1 / 32
    """Weight of the AuxK loss relative to the normalised reconstruction loss (Gao et al.: 1/32); 0 turns it off (the paper's Switch recipe)."""
    k_aux: int | None = None
    """Dead latents used by AuxK per token; None means min(d_in // 2, latents one token can reach)."""

    def check_auxk(self, reachable: int) -> None:
        """Validate the AuxK fields; ``reachable`` is how many latents one token's encoder covers."""
        check_number("auxk_coefficient", self.auxk_coefficient)
        check_int("k_aux", self.k_aux, optional=True)
        if self.k_aux is not None and self.k_aux > reachable:
            raise ValueError(f"k_aux={self.k_aux} exceeds the latents one token can reach ({reachable})")

    def resolved_k_aux(self, d_in: int, reachable: int) -> int:
        """``k_aux``, or Gao et al.'s ``d_in / 2`` capped by what one token's encoder reaches."""
        return self.k_aux if self.k_aux is not None else max(1, min(d_in // 2, reachable))


class AuxKTerms:
    """Mixin for TopK-family SAEs: the parent's ``training_terms`` plus ``auxk`` once latents are dead."""

    def training_terms(self, x: Tensor, out: ForwardOutput, dead: Tensor | None = None) -> dict[str, Tensor]:
        terms = super().training_terms(x, out, dead)
        auxk = auxk_term(self, x, out, dead)
        if auxk is not None:
            terms["auxk"] = auxk
        return terms


def auxk_term(model: SAE, x: Tensor, out: ForwardOutput, dead: Tensor | None) -> Tensor | None:
    """The weighted AuxK term of a TopK-family ``model``, or None when it does not apply.

    Args:
        x: ``[batch, d_in]`` the batch the forward pass saw; out: that pass's output.
        dead: ``[d_sae]`` bool mask of dead latents (None: no tracker, no term).
    """
    cfg = model.cfg
    if dead is None or cfg.auxk_coefficient == 0:
        return None
    n_dead = int(dead.sum())
    if n_dead == 0:
        return None
    k_aux = cfg.resolved_k_aux(model.d_in, model.encoder_weight().shape[1])
    code = dead_latent_code(model, x, out, dead, k_aux)
    dead_recon = model.exchange.decode(code, model.W_dec_flat)  # no b_dec: see losses.auxk
    residual = (x - out.x_hat).detach()
    nmse = losses.auxk(residual, dead_recon, n_dead, k_aux)
    return cfg.auxk_coefficient * losses.weight_unit(x) * nmse


def mask_bias(dead: Tensor, dtype: torch.dtype) -> Tensor:
    """``[d_sae]`` additive bias: 0 on dead latents, a large finite negative on live ones.

    A quarter of the dtype's largest value keeps ``pre + bias`` finite (no inf - inf) while
    dwarfing any real pre-activation, in float16/bfloat16 as in float32.
    """
    live_penalty = torch.full(dead.shape, -torch.finfo(dtype).max / 4, dtype=dtype, device=dead.device)
    return live_penalty.masked_fill(dead, 0.0)


def dead_latent_code(model: SAE, x: Tensor, out: ForwardOutput, dead: Tensor, k_aux: int) -> SparseCode:
    """Top ``k_aux`` dead-latent activations of each token, ``[batch, k_aux]``.

    Args:
        model: a TopK-family SAE (it has ``encoder_weight()`` and ``cfg.tile_rows``).
        x: ``[batch, d_in]`` the batch the forward pass saw (already in the model dtype).
        out: that forward pass's output (for the routed experts and gates of Switch SAEs).
        dead: ``[d_sae]`` bool, True for dead latents.
    """
    W_enc = model.encoder_weight()  # [n_experts, d_expert, d_in]
    bias = mask_bias(model.exchange.held_features(dead), W_enc.dtype).view(W_enc.shape[:2])  # [experts held, d_expert]
    if model.b_enc is not None:
        bias = bias + model.b_enc.view(W_enc.shape[:2])
    if out.experts is None:
        experts, gates = single_expert(x.shape[0], x.device), None
    else:
        n_active = out.experts.shape[-1]  # explicit: an empty batch cannot infer it
        experts = out.experts.reshape(x.shape[0], n_active)  # [batch, n_active]
        gates = out.gates.reshape(x.shape[0], n_active).detach().to(x.dtype)  # the forward pass's own gates
    return encode_routed(x, W_enc, bias, model.b_dec, gates, experts, k_aux, model.cfg.tile_rows, model.exchange)
