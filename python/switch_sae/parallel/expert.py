"""Expert parallelism for Switch SAEs: each process holds ``n_experts / W`` experts, and
tokens travel to their experts' process and back.

Layout: rank ``r`` holds experts ``[r E/W, (r+1) E/W)``, i.e. the matching slices of
``W_enc``, ``W_dec``, ``b_enc`` and ``feature_w`` (``models.sharded.EXPERT_PARAMETERS``);
the router, ``b_dec`` and ``feature_T`` are replicated and their gradients summed across
processes. Every process also holds its own slice of the global batch (data parallel over
tokens), so an expert sees every token routed to it, from every process.

One forward pass (``ExpertExchange``, the ``models.routed.Exchange`` of a sharded SAE):

    dispatch        (token, expert) pairs of this process, grouped by expert
    counts   ->     all_to_all of the [W, E/W] per-expert pair counts (so receivers size rows)
    tokens   ->     all_to_all of the pairs' token rows, d_in floats each (autograd)
    encode          the received pairs, regrouped by local expert, with the same custom op
    codes    <-     all_to_all back of each pair's k values (autograd) and k feature ids
    combine         at home: gate, and merge a token's n_active * k candidates into its top k
    decode   -> <-  each token's k (value, id) entries go to the process holding that decoder
                    row (one padded row of k per token and process), which decodes its part
                    with ``ops.decode`` and sends back d_in floats; home sums the parts

The backward pass is the same all-to-alls with the split sizes swapped (``alltoall.py``).

Why codes come back before decoding. With ``n_active = 1`` a token's k features all live on
its expert's process, so that process could decode at once and send back ``x_hat``: per token
``4 d_in`` bytes out and ``4 d_in`` back (plus the ``12 k`` bytes of the code, which home
needs for the dead-latent counters and L0), ``8 d_in + 12 k`` in all. Sending the code back
and decoding in a second round trip costs ``4 d_in + 12 k`` for the first trip and
``12 k + 4 d_in`` for the second: ``8 d_in + 24 k``, which is ``12 k`` more (for GPT-2 small,
d_in = 768 and k = 32: 6528 against 6144 bytes per token, +6 %). But with ``n_active > 1`` a
token's code is the top k of the union of its experts' candidates, which only home can pick
once every expert has answered: decoding at the experts would decode ``n_active * k``
features, the wrong reconstruction. So the round trip is what is built, for every
``n_active``; for ``n_active > 1`` its decode trip carries one row per (token, process)
that holds a kept feature, i.e. at most ``n_active`` of them. The backward pass moves the
same float rows again (gradients of the values and of the token rows, no ids).

What it leaves out: the collectives (``alltoall.py``) and the training step (``strategy.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..models.base import SparseCode
from ..models.routed import CodesBack, Grouped
from ..models.sharded import EXPERT_PARAMETERS
from ..models.switch import SwitchSAE
from .alltoall import Traffic, all_to_all, exchange_counts, exchange_rows


def expert_range(n_experts: int, rank: int, world: int) -> tuple[int, int]:
    """The experts ``[first, end)`` that ``rank`` of ``world`` holds."""
    if n_experts % world:
        raise ValueError(
            f"expert parallelism splits n_experts={n_experts} evenly over the {world} processes; "
            f"use a multiple of {world} experts or another process count"
        )
    held = n_experts // world
    return rank * held, (rank + 1) * held


class ExpertExchange:
    """Sends each (token, expert) pair to the process holding its expert, and decodes where
    the decoder rows live; see the module docstring for the steps and their bytes."""

    def __init__(self, n_experts: int, d_expert: int, rank: int, world: int, group) -> None:
        self.first, self.end = expert_range(n_experts, rank, world)
        self.total, self.held = n_experts, self.end - self.first
        self.held_latents = self.held * d_expert
        self.first_latent = self.first * d_expert
        self.rank, self.world, self.group = rank, world, group
        self.traffic = Traffic()

    def __deepcopy__(self, memo: dict) -> "ExpertExchange":
        return self  # a copy of the model (e.g. to save it in raw units) lives in the same processes

    def n_experts(self, held: int) -> int:
        if held != self.held:
            raise ValueError(f"this process holds {self.held} experts, but an encoder of {held} was passed")
        return self.total

    def held_features(self, per_feature: Tensor) -> Tensor:
        return per_feature[self.first_latent : self.first_latent + self.held_latents]

    def __call__(self, grouped: Grouped) -> tuple[Grouped, CodesBack]:
        world, held = self.world, self.held
        counts = grouped.counts.view(world, held)  # pairs this process sends to each rank's experts
        received_counts = exchange_counts(counts, self.group)  # [world, held]: pairs each rank sends here
        send = counts.sum(1).tolist()
        receive = received_counts.sum(1).tolist()
        rows = grouped.tokens[grouped.order // grouped.n_active]  # [pairs, d_in], expert by expert
        received = all_to_all(rows, send, receive, self.group, self.traffic)  # source by source
        # Regroup by local expert: within each source's block the rows are already expert by expert.
        expert_of_row = torch.arange(held, device=rows.device).repeat(world).repeat_interleave(received_counts.flatten())
        order = torch.argsort(expert_of_row, stable=True)
        offsets = torch.zeros(held + 1, dtype=torch.int64, device=rows.device)
        offsets[1:] = received_counts.sum(0).cumsum(0)
        at_experts = Grouped(received, order, offsets, n_active=1)
        position = torch.empty_like(grouped.order)
        position[grouped.order] = torch.arange(grouped.order.numel(), device=rows.device)  # pair p was sent as row position[p]

        def back(code: SparseCode) -> SparseCode:
            values = all_to_all(code.values, receive, send, self.group, self.traffic)
            indices = exchange_rows(code.indices + self.first_latent, receive, send, self.group, self.traffic)
            return SparseCode(values[position], indices[position])

        return at_experts, back

    def decode(self, code: SparseCode, W_dec_flat: Tensor) -> Tensor:
        values, indices = code  # [batch, width]
        owner = indices // self.held_latents  # [batch, width] the rank holding each decoder row
        tokens, blocks_values, blocks_indices = [], [], []
        for rank in range(self.world):
            mine = owner == rank
            rows = mine.any(-1).nonzero().squeeze(-1)  # tokens with a kept feature on `rank`
            keep = mine[rows]
            # Entries held elsewhere ride along as (0, feature 0): the row keeps width k.
            blocks_values.append(torch.where(keep, values[rows], torch.zeros((), dtype=values.dtype)))
            blocks_indices.append(torch.where(keep, indices[rows] - rank * self.held_latents, 0))
            tokens.append(rows)
        send = [t.numel() for t in tokens]
        receive = exchange_counts(torch.tensor(send, device=values.device), self.group).tolist()
        at_home_values = torch.cat(blocks_values)
        there_values = all_to_all(at_home_values, send, receive, self.group, self.traffic)
        there_indices = exchange_rows(torch.cat(blocks_indices), send, receive, self.group, self.traffic)
        parts = ops.decode(there_values, there_indices, W_dec_flat)  # [received, d_in]
        parts = all_to_all(parts, receive, send, self.group, self.traffic)  # back in `tokens` order
        return parts.new_zeros(values.shape[0], parts.shape[1]).index_add(0, torch.cat(tokens), parts)


def shard_experts_(model: SwitchSAE, rank: int, world: int, group) -> ExpertExchange:
    """Keep only ``rank``'s experts in ``model`` (new parameters, so the rest is freed) and give
    it the exchange that reaches the others; returns that exchange."""
    if not isinstance(model, SwitchSAE):
        raise TypeError(f"expert parallelism splits the experts of a Switch SAE; a {type(model).__name__} has none "
                        "(use parallel='data')")
    exchange = ExpertExchange(model.cfg.n_experts, model.cfg.d_expert, rank, world, group)
    for name in EXPERT_PARAMETERS:
        full = getattr(model, name, None)
        if full is not None:
            setattr(model, name, nn.Parameter(full.detach()[exchange.first : exchange.end].clone()))
    model.exchange = exchange
    return exchange
