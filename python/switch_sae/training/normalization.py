"""Input normalisation to ``E||x||^2 = d_in``, and folding it into the weights.

Training on ``x' = s x`` with ``s = sqrt(d_in / E||x||^2)`` makes hyper-parameters (the lr,
the L1/L0 coefficients, JumpReLU's threshold scale) transfer between models and layers.
An SAE trained on ``x'`` is turned into one that takes raw ``x`` by rescaling parameters:
with unit-norm decoder rows, ``x_hat(x) = x_hat'(s x) / s`` holds exactly when every code
value shrinks by ``s``, i.e. every additive bias and threshold is divided by ``s``, the
router's weight is multiplied by ``s`` (its logits must not change) and the encoder and
decoder weights stay put (pre-activations are homogeneous in ``x - b_dec``).

What it leaves out: when the scale is estimated (the trainer does it once, on the first
batch) and where it is stored (the trainer's checkpoint).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..models.base import SAE

# Parameter/buffer name -> how it changes when the input scale s is folded in.
_DIVIDE = {"b_dec", "b_enc", "b_router", "b_gate", "b_mag", "threshold"}
_MULTIPLY = {"W_router"}
_SHIFT_LOG = {"log_threshold"}
_UNCHANGED = {"W_enc", "W_dec", "r_mag", "feature_T", "feature_w"}


def estimate_scale(x: Tensor) -> float:
    """``sqrt(d_in / mean ||x||^2)`` over the tokens of ``x [batch, d_in]``."""
    mean_square = x.detach().double().pow(2).sum(-1).mean().item()
    if not math.isfinite(mean_square) or mean_square <= 0:
        raise ValueError(f"cannot normalise inputs whose mean squared norm is {mean_square}")
    return math.sqrt(x.shape[-1] / mean_square)


@torch.no_grad()
def fold_input_scale_(model: SAE, scale: float) -> SAE:
    """Rewrite ``model`` (trained on ``scale * x``) in place to take raw ``x``; returns it."""
    state = model.state_dict()
    unknown = sorted(
        name for name in state if name not in _DIVIDE | _MULTIPLY | _SHIFT_LOG | _UNCHANGED
    )
    if unknown:
        raise ValueError(
            f"cannot fold an input scale into {type(model).__name__}: no rule for {unknown}; "
            "add one to switch_sae.training.normalization"
        )
    for name, tensor in state.items():  # state_dict tensors share storage with the model
        if name in _DIVIDE:
            tensor.div_(scale)
        elif name in _MULTIPLY:
            tensor.mul_(scale)
        elif name in _SHIFT_LOG:
            tensor.sub_(math.log(scale))
    return model
