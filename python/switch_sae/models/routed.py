"""The routed TopK encoder shared by every TopK-family SAE (Switch, TopK, BatchTopK).

A TopK SAE is a Switch SAE with one expert: all of them encode through
``ops.dispatch`` + ``ops.encode_topk`` with ``W_enc [n_experts, d_expert, d_in]``
(``n_experts = 1`` for the dense-dictionary baselines), then scale by the router gate and,
with several active experts, merge the candidates into one top k. Keeping this in one
function means the sparse kernels, the gating and the merge are written once, and the
AuxK loss (``models.auxk``) can re-run the very same encoder with another
bias and another k.

What it leaves out: routing (the Switch model's job) and decoding (``ops.decode``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .base import SparseCode


def encode_routed(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor | None,
    b_dec: Tensor,
    gates: Tensor | None,
    experts: Tensor,
    k: int,
    tile_rows: int,
) -> SparseCode:
    """TopK(k) code of each token over the union of its routed experts.

    Args:
        x: ``[batch, d_in]``; W_enc: ``[n_experts, d_expert, d_in]``;
        b_enc: ``[n_experts, d_expert]`` or None; b_dec: ``[d_in]`` (the pre-bias);
        gates: ``[batch, n_active]`` multipliers of each expert's values, or None for 1;
        experts: ``[batch, n_active]`` int64 expert ids.
    Returns:
        ``SparseCode`` with values/indices ``[batch, k]`` (values gated, descending).
    """
    batch, n_active = experts.shape
    order, offsets = ops.dispatch(experts.reshape(-1), W_enc.shape[0])
    values, indices = ops.encode_topk(  # [batch * n_active, k] each
        x, W_enc, b_enc, b_dec, order, offsets, n_active, k, tile_rows
    )
    if gates is not None:
        values = (values.view(batch, n_active, k) * gates.unsqueeze(-1)).view(-1, k)
    if n_active == 1:
        return SparseCode(values, indices)
    # The global top k lies inside the union of each selected expert's top k.
    candidates = n_active * k
    top, pos = torch.topk(values.view(batch, candidates), k, dim=-1)  # [batch, k]
    return SparseCode(top, indices.view(batch, candidates).gather(1, pos))


def single_expert(batch: int, device: torch.device) -> Tensor:
    """``[batch, 1]`` int64 zeros: every token routed to the only expert of a TopK SAE."""
    return torch.zeros(batch, 1, dtype=torch.int64, device=device)
