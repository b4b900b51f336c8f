"""The all-to-all that moves rows between processes, differentiable, and the bytes it moved.

``all_to_all(rows, send_counts, recv_counts, group, traffic)`` sends ``rows[...]`` block by
block (``send_counts[r]`` rows to rank r, in rank order) and returns the blocks received
(``recv_counts[r]`` rows from rank r, in rank order), via ``torch.distributed.all_to_all_single``.
Its backward is the same exchange with the split sizes swapped: the gradient of a received
row goes back to the rank that sent it. Integer rows (feature ids) use ``exchange_rows``,
which records no gradient.

Every call adds the bytes that leave this process (its own block stays home) to a
``Traffic`` counter, in the forward and the backward pass, so benchmarks can compare
measured traffic with the analytic count.

What it leaves out: what the rows mean (``expert.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class Traffic:
    """Bytes sent to other processes by the all-to-alls of this process."""

    forward_bytes: int = 0
    backward_bytes: int = 0
    calls: int = 0

    def add(self, rows: Tensor, send_counts: list[int], rank: int, backward: bool) -> None:
        row_bytes = rows[0].numel() * rows.element_size() if rows.shape[0] else 0
        sent = (sum(send_counts) - send_counts[rank]) * row_bytes
        if backward:
            self.backward_bytes += sent
        else:
            self.forward_bytes += sent
            self.calls += 1

    def reset(self) -> None:
        self.forward_bytes = self.backward_bytes = self.calls = 0


def exchange_rows(rows: Tensor, send_counts: list[int], recv_counts: list[int], group, traffic: Traffic | None = None,
                  backward: bool = False) -> Tensor:
    """``rows [sum(send_counts), ...]`` -> ``[sum(recv_counts), ...]``, blocks in rank order; no autograd."""
    out = rows.new_empty((sum(recv_counts), *rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), recv_counts, send_counts, group=group)
    if traffic is not None:
        traffic.add(rows, send_counts, dist.get_rank(group), backward)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, send_counts, recv_counts, group, traffic):
        ctx.counts, ctx.group, ctx.traffic = (send_counts, recv_counts), group, traffic
        return exchange_rows(rows, send_counts, recv_counts, group, traffic)

    @staticmethod
    def backward(ctx, grad):
        send_counts, recv_counts = ctx.counts
        grad = exchange_rows(grad.contiguous(), recv_counts, send_counts, ctx.group, ctx.traffic, backward=True)
        return grad, None, None, None, None


def all_to_all(rows: Tensor, send_counts: list[int], recv_counts: list[int], group, traffic: Traffic | None = None) -> Tensor:
    """Differentiable ``exchange_rows``: the backward sends each row's gradient back to its sender."""
    return _AllToAll.apply(rows, send_counts, recv_counts, group, traffic)


def exchange_counts(counts: Tensor, group) -> Tensor:
    """``counts [world, ...]`` (what this rank sends to each rank) -> ``[world, ...]`` (what each
    rank sends here): the all-to-all that has to come before the rows, so receivers can size them."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out
