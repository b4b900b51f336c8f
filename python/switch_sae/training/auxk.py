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

What it leaves out: the loss arithmetic (``losses.auxk``) and deciding who is dead
(``DeadLatentTracker``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.base import SAE, ForwardOutput, SparseCode
from ..models.routed import encode_routed, single_expert


def supports_auxk(model: SAE) -> bool:
    """True for TopK-family models, whose encoder is the routed ``ops.encode_topk``."""
    return callable(getattr(model, "encoder_weight", None)) and hasattr(model.cfg, "tile_rows")


def default_k_aux(model: SAE) -> int:
    """``min(d_in // 2, d_expert)``: Gao et al.'s d_in / 2, capped by what one expert holds."""
    d_expert = model.encoder_weight().shape[1]
    return max(1, min(model.d_in // 2, d_expert))


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
        model: a TopK-family SAE (``supports_auxk``).
        x: ``[batch, d_in]`` the batch the forward pass saw (already in the model dtype).
        out: that forward pass's output (for the routed experts and gates of Switch SAEs).
        dead: ``[d_sae]`` bool, True for dead latents.
    """
    W_enc = model.encoder_weight()  # [n_experts, d_expert, d_in]
    bias = mask_bias(dead, W_enc.dtype).view(W_enc.shape[:2])  # [n_experts, d_expert]
    if model.b_enc is not None:
        bias = bias + model.b_enc.view(W_enc.shape[:2])
    if out.experts is None:
        experts, gates = single_expert(x.shape[0], x.device), None
    else:
        experts = out.experts.reshape(x.shape[0], -1)  # [batch, n_active]
        gates = out.router_probs.reshape(x.shape[0], -1).gather(1, experts).detach().to(x.dtype)
    return encode_routed(x, W_enc, bias, model.b_dec, gates, experts, k_aux, model.cfg.tile_rows)
