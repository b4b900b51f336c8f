"""Plain PyTorch twins of every ``switch_sae`` custom op, and of the whole forward pass.

This module is the executable specification: each function has the signature and the
semantics of the op of the same name (see ``csrc/registration.cpp``), is written for
clarity rather than speed, and is what the tests compare the compiled kernels against.
It is also the fallback path when the compiled extension is absent.

Vocabulary: ``batch`` tokens, ``n_active`` experts per token, ``rows = batch * n_active``
(token, expert) pairs in token-major order (pair ``p`` is token ``p // n_active``),
``n_experts``, ``d_expert`` features per expert, ``d_sae = n_experts * d_expert``, ``d_in``.

What it leaves out: speed. ``switch_forward`` materialises ``[batch, d_sae]`` on purpose:
it is the dense-and-mask computation of the paper's reference code.
"""

from __future__ import annotations

import torch
from torch import Tensor


def dispatch(experts: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
    """Stable grouping of (token, expert) pairs by expert.

    Args:
        experts: ``[rows]`` int64 expert id of each pair, in ``[0, n_experts)``.
    Returns:
        order: ``[rows]`` int64 pair ids sorted stably by expert.
        offsets: ``[n_experts + 1]`` int64; expert ``e`` owns ``order[offsets[e]:offsets[e+1]]``.
    """
    order = torch.sort(experts, stable=True).indices
    counts = torch.bincount(experts, minlength=n_experts)
    offsets = torch.zeros(n_experts + 1, dtype=torch.int64, device=experts.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return order, offsets


def topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k first entries of the last dim of ``pre`` by the TopK rule of every kernel.

    The rule: larger values first, NaN above every number (as ``torch.topk``), and equal
    values (``-0.0 == +0.0``) by lower index. It fixes both which features are chosen
    and their order, so the CPU and CUDA kernels choose the same features even where
    bfloat16 rounding makes many pre-activations tie exactly. ``torch.topk`` leaves ties
    unspecified (its CPU and CUDA kernels differ); a stable descending sort does not.

    Returns:
        values, indices: ``[..., k]`` each.
    """
    ordered = torch.sort(pre, dim=-1, descending=True, stable=True)
    return ordered.values[..., :k], ordered.indices[..., :k]


def encode_topk(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor | None,
    b_dec: Tensor,
    order: Tensor,
    offsets: Tensor,
    n_active: int,
    k: int,
    tile_rows: int,
) -> tuple[Tensor, Tensor]:
    """Routed encoder + TopK + ReLU, one expert at a time.

    Args:
        x: ``[batch, d_in]``; W_enc: ``[n_experts, d_expert, d_in]``;
        b_enc: ``[n_experts, d_expert]`` or None; b_dec: ``[d_in]`` (the pre-bias);
        order, offsets: from ``dispatch``; tile_rows: ignored here (a kernel tiling knob).
    Returns:
        values: ``[rows, k]`` post-ReLU activations, in the order of ``topk`` (descending,
            ties by lower feature id), not gated.
        indices: ``[rows, k]`` int64 global feature ids ``expert * d_expert + local``.
    """
    n_experts, d_expert, _ = W_enc.shape
    rows = x.shape[0] * n_active
    values = x.new_zeros(rows, k)
    indices = torch.zeros(rows, k, dtype=torch.int64, device=x.device)
    x_centered = x - b_dec  # [batch, d_in]
    for e in range(n_experts):
        pairs = order[offsets[e] : offsets[e + 1]]  # [rows_e]
        pre = x_centered[pairs // n_active] @ W_enc[e].T  # [rows_e, d_expert]
        if b_enc is not None:
            pre = pre + b_enc[e]
        top_values, top_local = topk(pre, k)
        values[pairs] = torch.relu(top_values)
        indices[pairs] = top_local + e * d_expert
    return values, indices


def decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Gather-sum decoder: ``out[r] = sum_j values[r, j] * W_dec[indices[r, j]]``.

    Args:
        values: ``[rows, k]``; indices: ``[rows, k]`` int64; W_dec: ``[d_sae, d_in]``.
    Returns:
        ``[rows, d_in]``.
    """
    return torch.einsum("rk,rkd->rd", values, W_dec[indices])


def decode_backward(
    grad_out: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor
) -> tuple[Tensor, Tensor]:
    """Gradients of ``decode``.

    Returns:
        grad_values: ``[rows, k]`` = ``<grad_out[r], W_dec[indices[r, j]]>``.
        grad_W_dec: ``[d_sae, d_in]`` = per feature, sum of ``values * grad_out[r]``.
    """
    grad_values = torch.einsum("rd,rkd->rk", grad_out, W_dec[indices])
    contributions = values.unsqueeze(-1) * grad_out.unsqueeze(1)  # [rows, k, d_in]
    grad_W_dec = torch.zeros_like(W_dec).index_add_(
        0, indices.flatten(), contributions.flatten(0, 1)
    )
    return grad_values, grad_W_dec


def encode_backward(
    grad_values: Tensor,
    values: Tensor,
    indices: Tensor,
    x: Tensor,
    W_enc: Tensor,
    b_dec: Tensor,
    n_active: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``encode_topk`` (ReLU mask included) w.r.t. x, W_enc and b_enc.

    ``grad_b_dec`` is ``-grad_x.sum(0)`` and is left to the caller.

    Returns:
        grad_x: ``[batch, d_in]``; grad_W_enc: ``[n_experts, d_expert, d_in]``;
        grad_b_enc: ``[n_experts, d_expert]``.
    """
    n_experts, d_expert, d_in = W_enc.shape
    grad_pre = torch.where(values > 0, grad_values, torch.zeros_like(grad_values))  # [rows, k]
    W_flat = W_enc.reshape(n_experts * d_expert, d_in)
    tokens = torch.arange(values.shape[0], device=x.device) // n_active  # [rows]
    grad_x_rows = torch.einsum("rk,rkd->rd", grad_pre, W_flat[indices])  # [rows, d_in]
    grad_x = torch.zeros_like(x).index_add_(0, tokens, grad_x_rows)
    x_centered = (x - b_dec)[tokens]  # [rows, d_in]
    contributions = grad_pre.unsqueeze(-1) * x_centered.unsqueeze(1)  # [rows, k, d_in]
    grad_W_flat = torch.zeros_like(W_flat).index_add_(
        0, indices.flatten(), contributions.flatten(0, 1)
    )
    grad_b_enc = torch.zeros(n_experts * d_expert, dtype=W_enc.dtype, device=W_enc.device)
    grad_b_enc.index_add_(0, indices.flatten(), grad_pre.flatten().to(W_enc.dtype))
    return (
        grad_x,
        grad_W_flat.view(n_experts, d_expert, d_in),
        grad_b_enc.view(n_experts, d_expert),
    )


GATES = ("prob", "renormalized")


def route(
    x: Tensor, W_router: Tensor, b_router: Tensor, n_active: int, gate: str = "prob"
) -> tuple[Tensor, Tensor, Tensor]:
    """Router of the paper: ``probs = softmax((x - b_router) @ W_router.T)``, top-n_active.

    ``gate`` says how a selected expert's values are scaled:

    - ``"prob"`` (the paper): by its router probability, not renormalised, so with one
      active expert the gate is ``p_max`` and the router learns from reconstruction;
    - ``"renormalized"`` (Scale SAE): by its probability divided by the sum over the
      selected experts, so the gates of a token sum to 1. With one active expert the gate
      is then always 1 and only the load-balancing loss trains the router.

    Returns:
        probs: ``[batch, n_experts]`` (float32 or wider); gates: ``[batch, n_active]``;
        experts: ``[batch, n_active]`` int64.
    """
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    logits = (x - b_router) @ W_router.T  # [batch, n_experts]
    probs = torch.softmax(logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits, dim=-1)
    gates, experts = torch.topk(probs, n_active, dim=-1)
    if gate == "renormalized":
        gates = gates / gates.sum(-1, keepdim=True)  # [batch, n_active]
    return probs, gates, experts


def switch_forward(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor | None,
    W_dec: Tensor,
    W_router: Tensor,
    b_router: Tensor,
    b_dec: Tensor,
    k: int,
    n_active: int = 1,
    gate: str = "prob",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The whole Switch SAE forward, dense-and-mask, as the paper's reference code does it.

    Every expert encodes every token (``[batch, d_sae]`` pre-activations), experts not
    selected for a token are masked out, and one TopK(k) over the gated union picks the
    code. Differentiable by ordinary autograd.

    Args:
        x: ``[batch, d_in]``; W_enc, W_dec: ``[n_experts, d_expert, d_in]``;
        b_enc: ``[n_experts, d_expert]`` or None; W_router: ``[n_experts, d_in]``;
        b_router, b_dec: ``[d_in]``; gate: as in ``route``.
    Returns:
        x_hat ``[batch, d_in]``, values ``[batch, k]`` (gated, descending), indices
        ``[batch, k]``, router probs ``[batch, n_experts]``, experts ``[batch, n_active]``.
    """
    n_experts, d_expert, d_in = W_enc.shape
    probs, gates, experts = route(x, W_router, b_router, n_active, gate)
    pre = torch.einsum("bd,efd->bef", x - b_dec, W_enc)  # [batch, n_experts, d_expert]
    if b_enc is not None:
        pre = pre + b_enc
    # Per selected expert: TopK, ReLU, gate. Unselected experts contribute nothing.
    gate_full = torch.zeros_like(probs).scatter(1, experts, gates)  # [batch, n_experts]
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter(1, experts, True)
    top_values, top_local = topk(pre, k)  # per expert, [batch, n_experts, k]
    gated = torch.relu(top_values) * gate_full.to(pre.dtype).unsqueeze(-1)
    gated = torch.where(selected.unsqueeze(-1), gated, torch.full_like(gated, -1.0))
    global_ids = top_local + torch.arange(n_experts, device=x.device).unsqueeze(-1) * d_expert
    values, pos = torch.topk(gated.flatten(1), k, dim=-1)  # [batch, k]
    indices = global_ids.flatten(1).gather(1, pos)
    x_hat = decode(values, indices, W_dec.reshape(n_experts * d_expert, d_in)) + b_dec
    return x_hat, values, indices, probs, experts
