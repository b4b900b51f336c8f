"""Which tokens "the batch" means when a loss averages over it: this process's, or every process's.

Training on several processes splits each global batch of ``N`` tokens into per-process
slices. A term that averages over tokens (MSE, the router's mean probability ``P_i``, L1,
L0) must then be each process's *share* of the global average, ``sum over its rows / N``,
so that the shares add up to the global term and their gradients, summed across processes,
to the single-process gradient. A statistic of the data that multiplies or divides a term
(the total variance, the mean energy, the expert load ``f_i``, BatchTopK's batch-wide
threshold) must be the global value, reduced across processes.

``current()`` is the scope in force; outside ``using(...)`` it is ``LOCAL``: the batch is
this process's rows and nothing is reduced, exactly the single-process arithmetic. The
distributed scope lives in ``switch_sae.parallel``; the trainer enters it around a step.

What it leaves out: the collectives themselves (``switch_sae.parallel.reduction``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
from torch import Tensor


class BatchScope:
    """The batch of one process: the local rows are the whole batch."""

    distributed = False

    def n_tokens(self, local: int) -> int:
        """Tokens in the whole batch, given this process's ``local`` count."""
        return local

    def sum(self, t: Tensor) -> Tensor:
        """``t`` (detached) summed over every process holding part of the batch."""
        return t.detach()

    def min(self, t: Tensor) -> Tensor:
        """Elementwise minimum of ``t`` (detached) over the processes."""
        return t.detach()

    def largest(self, t: Tensor, n: int) -> Tensor:
        """The ``n`` largest entries of the 1-D ``t`` concatenated over the processes (unsorted)."""
        return torch.topk(t, n, sorted=False).values


LOCAL = BatchScope()
_CURRENT: ContextVar[BatchScope] = ContextVar("switch_sae_batch_scope", default=LOCAL)


def current() -> BatchScope:
    return _CURRENT.get()


@contextlib.contextmanager
def using(scope: BatchScope) -> Iterator[BatchScope]:
    """Make ``scope`` the batch of every loss computed inside the block."""
    token = _CURRENT.set(scope)
    try:
        yield scope
    finally:
        _CURRENT.reset(token)
