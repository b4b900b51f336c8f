"""Collectives over the batch split across processes: the global batch scope, gathering
rows, summing gradients and metric shares, the global gradient norm.

Gradients are summed with an explicit ``all_reduce`` rather than DDP: each process's loss is
already its share of the global loss (``models.batch_scope``), so the *sum* of the
processes' gradients is the single-process gradient, with no ``1/W`` to undo; DDP would
average, and would need ``find_unused_parameters`` whenever AuxK is idle. The gradients
travel as one flat buffer per dtype (one collective, like DDP's buckets at this size).

What it leaves out: the exchange of tokens between experts (``expert.py``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..models.batch_scope import BatchScope


def gather_rows(x: Tensor, group) -> Tensor:
    """Every process's ``x [n_r, ...]`` concatenated in rank order (the ``n_r`` may differ)."""
    world = dist.get_world_size(group)
    sizes = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=group)
    sizes = [int(s) for s in all_sizes]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    blocks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(blocks, padded.contiguous(), group=group)
    return torch.cat([block[:n] for block, n in zip(blocks, sizes)])


def all_reduce(t: Tensor, group, op=dist.ReduceOp.SUM) -> Tensor:
    """A reduced copy of ``t`` (detached); ``t`` itself is left alone."""
    out = t.detach().clone()
    dist.all_reduce(out, op=op, group=group)
    return out


class ProcessBatchScope(BatchScope):
    """The batch is the union of every process's rows: ``n_tokens`` of them in all."""

    distributed = True

    def __init__(self, group, n_tokens: int) -> None:
        self.group, self.total = group, n_tokens

    def n_tokens(self, local: int) -> int:
        return self.total

    def sum(self, t: Tensor) -> Tensor:
        return all_reduce(t, self.group)

    def min(self, t: Tensor) -> Tensor:
        return all_reduce(t, self.group, dist.ReduceOp.MIN)

    def largest(self, t: Tensor, n: int) -> Tensor:
        # The global n largest are among each process's own n largest.
        local = torch.topk(t, min(n, t.numel()), sorted=False).values
        return torch.topk(gather_rows(local, self.group), n, sorted=False).values


def sum_gradients_(parameters: list[nn.Parameter], group) -> None:
    """Replace each gradient by its sum over the processes.

    A parameter with no gradient on every process keeps none (as in one process, where the
    optimiser then skips it); one that has a gradient somewhere gets zeros where it has none.
    """
    if not parameters:
        return
    device = parameters[0].device
    has = all_reduce(torch.tensor([p.grad is not None for p in parameters], dtype=torch.int32, device=device),
                     group, dist.ReduceOp.MAX)
    live = [p for p, h in zip(parameters, has.tolist()) if h]
    for dtype in {p.dtype for p in live}:
        same = [p for p in live if p.dtype == dtype]
        for p in same:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in same])
        dist.all_reduce(flat, group=group)
        for p, g in zip(same, flat.split([p.numel() for p in same])):
            p.grad.copy_(g.view_as(p))


def clip_grad_norm_(replicated: list[nn.Parameter], sharded: list[nn.Parameter], max_norm: float, group) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over parameters split across processes: the norm of
    the replicated gradients (equal everywhere) and of every process's shards together."""
    def squared(params: list[nn.Parameter]) -> Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.float32, device=params[0].device if params else "cpu")
        return torch.nn.utils.get_total_norm(grads).float().pow(2)

    total = (squared(replicated) + all_reduce(squared(sharded), group)).sqrt()
    clip_to_norm_([*replicated, *sharded], max_norm, total)
    return total


def clip_to_norm_(params: list[nn.Parameter], max_norm: float, total: Tensor) -> None:
    """``torch.nn.utils.clip_grads_with_norm_``, skipped when its scale would be exactly 1.

    Its scale is ``min(1, max_norm / (total + 1e-6))``; an unclipped step would still pass over
    every gradient to multiply it by 1 (5-9 ms of a 64-expert step on 2 cores). A non-finite
    norm is passed on, as before."""
    if not float(total) + 1e-6 <= max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)


def sum_shares(shares: dict[str, Tensor], group) -> dict[str, float]:
    """Scalars that are each process's share of a batch average, summed: the batch's values."""
    if not shares:
        return {}
    stacked = torch.stack([t.detach().to(torch.float64) for t in shares.values()])
    return dict(zip(shares, all_reduce(stacked, group).tolist()))
