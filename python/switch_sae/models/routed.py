"""The routed TopK path shared by every TopK-family SAE (Switch, TopK, BatchTopK), as stages.

A TopK SAE is a Switch SAE with one expert, so all three encode and decode the same way:

    route     x [batch, d_in] -> experts, gates [batch, n_active]        (the model's own; one expert for TopK)
    dispatch  experts -> Grouped: the rows = batch * n_active (token, expert) pairs, grouped by expert
    exchange  Grouped -> Grouped where the experts live, and the way back  (identity on one process)
    encode    Grouped -> values, indices [rows, k]: each pair's TopK over its expert's features
    combine   gate each pair's values; merge a token's n_active * k candidates into its top k -> [batch, k]
    decode    SparseCode [batch, k] -> x_hat [batch, d_in]: a gather-sum of decoder rows, plus b_dec

``Grouped`` is the hand-off between dispatch and encode: tokens, the pairs' order and the
per-expert offsets. Under expert parallelism an ``Exchange`` sends each expert's pairs to the
process that owns it (an all-to-all, counts first) and brings the codes back; it also
decodes, because the decoder rows of an expert live where the expert does
(``switch_sae.parallel.expert``). Everything before and after it is unchanged. Keeping the stages in one place means the sparse kernels,
the gating and the merge are written once, and the AuxK loss (``models.auxk``) re-runs the
very same encoder with another bias and another k.

What it leaves out: routing itself (``SwitchSAE.route``) and the kernels (``ops``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .. import ops
from .base import SAE, ForwardOutput, SparseCode


@dataclass(frozen=True)
class Grouped:
    """(token, expert) pairs grouped by expert: what dispatch hands to the experts.

    Pair ``p`` is token ``p // n_active``'s ``p % n_active``-th expert and reads row
    ``tokens[p // n_active]``; expert ``e`` owns the pairs ``order[offsets[e]:offsets[e + 1]]``.
    """

    tokens: Tensor  # [n_tokens, d_in]
    order: Tensor  # [rows] int64 pair ids, expert by expert; rows = n_tokens * n_active
    offsets: Tensor  # [n_experts + 1] int64
    n_active: int

    @property
    def counts(self) -> Tensor:
        """``[n_experts]`` pairs per expert (what an all-to-all exchanges first)."""
        return self.offsets.diff()


CodesBack = Callable[[SparseCode], SparseCode]


class Exchange(Protocol):
    """Moves grouped pairs to the process that owns their experts, and their codes back.

    Called with the pairs this process dispatched, it returns the pairs its own experts must
    encode and a function that turns their codes (``[received rows, k]``, in the received
    pairs' order) into the codes of the dispatched pairs (``[rows, k]``, pair order).
    """

    def __call__(self, grouped: Grouped) -> tuple[Grouped, CodesBack]: ...

    def decode(self, code: SparseCode, W_dec_flat: Tensor) -> Tensor:
        """``[batch, width]`` code (global feature ids) -> ``[batch, d_in]``
        ``sum_j values_j W_dec[indices_j]`` (no ``b_dec``); ``W_dec_flat`` holds this process's rows."""
        ...

    def n_experts(self, held: int) -> int:
        """Experts in the whole SAE, given that this process holds ``held`` of them."""
        ...

    def held_features(self, per_feature: Tensor) -> Tensor:
        """The entries of a ``[d_sae]`` per-feature tensor that belong to this process's experts."""
        ...


def _unchanged(code: SparseCode) -> SparseCode:
    return code


class LocalExchange:
    """The exchange of one process: every expert is here, so nothing moves."""

    def __call__(self, grouped: Grouped) -> tuple[Grouped, CodesBack]:
        return grouped, _unchanged

    def decode(self, code: SparseCode, W_dec_flat: Tensor) -> Tensor:
        return ops.decode(code.values, code.indices, W_dec_flat)

    def n_experts(self, held: int) -> int:
        return held

    def held_features(self, per_feature: Tensor) -> Tensor:
        return per_feature


LOCAL_EXCHANGE = LocalExchange()


def dispatch(x: Tensor, experts: Tensor, n_experts: int) -> Grouped:
    """Group the pairs of ``x [batch, d_in]`` and ``experts [batch, n_active]`` by expert."""
    order, offsets = ops.dispatch(experts.reshape(-1), n_experts)  # [rows], [n_experts + 1]
    return Grouped(x, order, offsets, experts.shape[1])


def encode(grouped: Grouped, W_enc: Tensor, b_enc: Tensor | None, b_dec: Tensor, k: int, tile_rows: int) -> SparseCode:
    """Each pair's ReLU'd TopK(k) over its expert's features, not gated.

    Args:
        W_enc: ``[n_experts, d_expert, d_in]``; b_enc: ``[n_experts, d_expert]`` or None;
        b_dec: ``[d_in]`` (the pre-bias).
    Returns:
        values, indices ``[rows, k]`` in pair order, descending; indices are global feature ids.
    """
    g = grouped
    values, indices = ops.encode_topk(g.tokens, W_enc, b_enc, b_dec, g.order, g.offsets, g.n_active, k, tile_rows)
    return SparseCode(values, indices)


def combine(code: SparseCode, gates: Tensor | None, n_active: int) -> SparseCode:
    """Gate each pair's values and merge each token's ``n_active * k`` candidates into its top k.

    Args:
        code: ``[batch * n_active, k]`` per pair (token-major); gates: ``[batch, n_active]``
            multipliers of each expert's values, or None for 1.
    Returns:
        ``SparseCode`` ``[batch, k]``, values descending.
    """
    values, indices = code
    k = values.shape[1]
    batch = values.shape[0] // n_active
    if gates is not None:
        values = (values.view(batch, n_active, k) * gates.unsqueeze(-1)).view(-1, k)
    if n_active == 1:
        return SparseCode(values, indices)
    # The global top k lies inside the union of each selected expert's top k.
    candidates = n_active * k
    top, pos = torch.topk(values.view(batch, candidates), k, dim=-1)  # [batch, k]
    return SparseCode(top, indices.view(batch, candidates).gather(1, pos))


def decode(code: SparseCode, W_dec_flat: Tensor, b_dec: Tensor, exchange: Exchange = LOCAL_EXCHANGE) -> Tensor:
    """``[batch, width]`` code -> ``x_hat [batch, d_in]``: ``sum_j values_j W_dec_flat[indices_j] + b_dec``."""
    return exchange.decode(code, W_dec_flat) + b_dec


def encode_routed(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor | None,
    b_dec: Tensor,
    gates: Tensor | None,
    experts: Tensor,
    k: int,
    tile_rows: int,
    exchange: Exchange = LOCAL_EXCHANGE,
) -> SparseCode:
    """dispatch -> exchange -> encode -> exchange back -> combine: the TopK(k) code of each
    token over the union of its routed experts.

    Args:
        x: ``[batch, d_in]``; W_enc: ``[n_experts, d_expert, d_in]``;
        b_enc: ``[n_experts, d_expert]`` or None; b_dec: ``[d_in]`` (the pre-bias);
        gates: ``[batch, n_active]`` multipliers of each expert's values, or None for 1;
        experts: ``[batch, n_active]`` int64 expert ids.
    Returns:
        ``SparseCode`` with values/indices ``[batch, k]`` (values gated, descending).
    """
    grouped = dispatch(x, experts, exchange.n_experts(W_enc.shape[0]))
    at_experts, back = exchange(grouped)
    code = back(encode(at_experts, W_enc, b_enc, b_dec, k, tile_rows))  # [batch * n_active, k]
    return combine(code, gates, grouped.n_active)


def single_expert(batch: int, device: torch.device) -> Tensor:
    """``[batch, 1]`` int64 zeros: every token routed to the only expert of a TopK SAE."""
    return torch.zeros(batch, 1, dtype=torch.int64, device=device)


class RoutedSAE(SAE):
    """What the TopK family shares: a sparse code from the routed encoder, and its decoder.

    A subclass provides ``encode_batch(x, update_state)``: ``x [batch, d_in]`` -> the code
    ``[batch, width]`` and the extra ``ForwardOutput`` fields of that pass (router outputs
    ``[batch, ...]``, or an ``aux`` dict); ``update_state`` (true in a training forward pass)
    lets it update running statistics such as BatchTopK's threshold. ``exchange`` is where
    routed pairs meet their experts; the default keeps them on this process.
    """

    exchange: Exchange = LOCAL_EXCHANGE

    def encode_batch(self, x: Tensor, update_state: bool) -> tuple[SparseCode, dict[str, Any]]:
        raise NotImplementedError

    def encode(self, x: Tensor) -> SparseCode:
        """``x [..., d_in]`` -> ``SparseCode`` with values/indices of shape ``[..., width]``."""
        x, lead = self.check_input(x)
        code, _ = self.encode_batch(x, update_state=False)
        return SparseCode(*(_unflatten(t, lead) for t in code))

    def encode_dense(self, x: Tensor) -> Tensor:
        values, indices = self.encode(x)
        return values.new_zeros(*values.shape[:-1], self.d_sae).scatter_add(-1, indices, values)

    def decode(self, code: SparseCode) -> Tensor:
        values, indices = code  # [..., width] each
        lead, width = values.shape[:-1], values.shape[-1]
        code = SparseCode(values.reshape(-1, width), indices.reshape(-1, width))
        flat = decode(code, self.W_dec_flat, self.b_dec, self.exchange)
        return _unflatten(flat, lead)

    def forward(self, x: Tensor) -> ForwardOutput:
        x, lead = self.check_input(x)
        x = self.hook_sae_input(x)  # [batch, d_in]
        code, extras = self.encode_batch(x, update_state=self.training)
        values = self.hook_sae_acts_post(code.values)  # [batch, width]
        x_hat = self.hook_sae_recons(decode(SparseCode(values, code.indices), self.W_dec_flat, self.b_dec, self.exchange))
        extras = {name: _unflatten(t, lead) if isinstance(t, Tensor) else t for name, t in extras.items()}
        return ForwardOutput(
            x_hat=_unflatten(x_hat, lead),
            code=SparseCode(_unflatten(values, lead), _unflatten(code.indices, lead)),
            acts=None,
            **extras,
        )


def _unflatten(t: Tensor, lead: torch.Size) -> Tensor:
    """``[batch, n]`` -> ``[*lead, n]`` (explicit n: a batch of 0 tokens cannot infer it)."""
    return t.view(*lead, t.shape[-1])
