"""The parameter update after ``backward``, in as few passes over memory as torch ops allow.

The recipe (paper, appendix A), in order: drop from each decoder-row gradient its component
along the row; clip the global gradient norm; step the optimiser; rescale the decoder rows
to unit norm. Done op by op on the whole ``W_dec [d_sae, d_in]`` (the model's
``remove_decoder_parallel_grad_`` and ``normalize_decoder_``, ``clip_grad_norm_``, the
optimiser), each torch op streams the whole matrix through memory once or twice and
allocates ``[d_sae, d_in]`` temporaries: about 22 passes over the decoder's size per step,
against 7 for Adam itself.

Here the decoder is updated in blocks of rows small enough (``DECODER_BLOCK_BYTES`` per
tensor) that a block's gradient, weights and Adam moments stay in the CPU's last-level
cache between the row operations, so each block crosses the memory bus once per phase:

1. per block: remove the parallel component and take the block's gradient norm (the
   global norm, which clipping needs before any update, is then known without another
   pass);
2. the other parameters' gradient norms, the clip coefficient; scale their gradients only
   when clipping changes them (``clip_grad_norm_`` multiplies by 1 otherwise);
3. the optimiser steps every other parameter; then per decoder block: scale (when
   clipping), Adam's fused update (``torch._fused_adam_``, the kernel of
   ``torch.optim.Adam(fused=True)``, on the optimiser's own state, so checkpoints do not
   change) and unit-norm rows.

The result equals the op-by-op sequence up to float rounding (the global norm is summed
in another order). With another optimiser (or Adam with options the fused kernel call here
does not pass: amsgrad, weight decay, maximize), step 3 is ``optimizer.step()`` on every
parameter, then the blocked renormalisation. Off the CPU a block is the whole matrix
(launches, not cache, are what count there).

What it leaves out: the optimiser's construction (``optim.py``) and the loss (the model).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.base import SAE, remove_parallel_rows_, unit_rows_

DECODER_BLOCK_BYTES = 2 << 20
"""Bytes of one tensor's block of decoder rows on the CPU: four such blocks (gradient,
weights, two Adam moments) must fit the last-level cache together."""


def row_blocks(W: Tensor) -> list[slice]:
    """Row ranges of ``W [rows, d_in]`` of about ``DECODER_BLOCK_BYTES`` each (one on a GPU)."""
    rows = W.shape[0]
    if W.device.type != "cpu":
        return [slice(0, rows)]
    step = max(1, DECODER_BLOCK_BYTES // (W.shape[1] * W.element_size()))
    return [slice(a, min(a + step, rows)) for a in range(0, rows, step)]


def fused_adam_group(optimizer: torch.optim.Optimizer, param: Tensor) -> dict | None:
    """The param group of ``param`` if ``optimizer`` is a fused Adam this module can step
    block by block, else None."""
    if not isinstance(optimizer, torch.optim.Adam):
        return None
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    plain = group is not None and group["fused"] and not (
        group["amsgrad"] or group["weight_decay"] or group["maximize"] or group["capturable"]
        or group["differentiable"] or group.get("decoupled_weight_decay", False) or torch.is_tensor(group["lr"]))
    return group if plain else None


def adam_state(optimizer: torch.optim.Adam, param: Tensor) -> dict:
    """``param``'s Adam state, created as ``torch.optim.Adam(fused=True)`` creates it."""
    state = optimizer.state[param]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


def adam_blocks_(W: Tensor, G: Tensor, state: dict, group: dict, blocks: list[slice], scale: Tensor | None) -> None:
    """Per block: ``G *= scale`` (if given), the fused Adam update of ``W``, unit-norm rows."""
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq = (state[name].view(W.shape) for name in ("exp_avg", "exp_avg_sq"))
    state["step"] += 1  # what Adam does once per step before its kernel
    for rows in blocks:
        if scale is not None:
            G[rows].mul_(scale)
        torch._fused_adam_([W[rows]], [G[rows]], [exp_avg[rows]], [exp_avg_sq[rows]], [], [state["step"]],
                           amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=0.0,
                           eps=group["eps"], maximize=False, grad_scale=None, found_inf=None)
        unit_rows_(W[rows])


@torch.no_grad()
def update_op_by_op_(model: SAE, optimizer: torch.optim.Optimizer, max_norm: float) -> Tensor:
    """The same update one torch op at a time on whole tensors: the specification
    ``update_parameters_`` is tested against, and the baseline the benchmarks time it with."""
    model.remove_decoder_parallel_grad_()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    optimizer.step()
    model.normalize_decoder_()
    return norm


def project_decoder_grad_(model: SAE) -> Tensor:
    """Phase 1: remove each decoder-row gradient's component along its row, block by block,
    and return the norm of the projected gradient (taken while each block is in cache)."""
    W, G = model.W_dec_flat, model.W_dec.grad.view(model.d_sae, model.d_in)
    block_norms = []
    for rows in row_blocks(W):
        remove_parallel_rows_(G[rows], W[rows])
        block_norms.append(torch.linalg.vector_norm(G[rows]))
    return torch.linalg.vector_norm(torch.stack(block_norms))


def step_and_renormalise_(model: SAE, optimizer: torch.optim.Optimizer, scale: Tensor | None) -> None:
    """Phase 3: the optimiser's step on every parameter, the decoder's block by block with
    its renormalisation when the optimiser is a plain fused Adam, else after the step."""
    decoder = model.W_dec
    W, G = model.W_dec_flat, decoder.grad.view(model.d_sae, model.d_in)
    group = fused_adam_group(optimizer, decoder)
    if group is None:
        if scale is not None:
            G.mul_(scale)
        optimizer.step()
        for rows in row_blocks(W):
            unit_rows_(W[rows])
        return
    grad, decoder.grad = decoder.grad, None  # Adam skips a parameter without a gradient
    try:
        optimizer.step()
    finally:
        decoder.grad = grad
    adam_blocks_(W, G, adam_state(optimizer, decoder), group, row_blocks(W), scale)


@torch.no_grad()
def update_parameters_(model: SAE, optimizer: torch.optim.Optimizer, max_norm: float) -> Tensor:
    """Project, clip, step and renormalise (see the module docstring); returns the total
    gradient norm before clipping, as ``torch.nn.utils.clip_grad_norm_`` does."""
    params = [p for p in model.parameters() if p.grad is not None]
    if model.W_dec.grad is None:  # nothing to project: the plain sequence
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()
        model.normalize_decoder_()
        return norm
    others = [p.grad for p in params if p is not model.W_dec]
    norms = [project_decoder_grad_(model), *(torch.linalg.vector_norm(g) for g in others)]
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = max_norm / (total + 1e-6)
    scale = None if bool(coef >= 1) else coef.clamp(max=1.0)  # NaN scales, as clip_grad_norm_ would
    if scale is not None:
        torch._foreach_mul_(others, scale)
    step_and_renormalise_(model, optimizer, scale)
    return total
