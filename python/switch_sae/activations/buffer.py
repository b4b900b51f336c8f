"""A shuffling buffer that turns chunks of activations into training batches.

Consecutive tokens of one context are strongly correlated, so batches are drawn from a
large pool (``capacity`` rows, as large as memory allows) rather than in harvest order:
fill the pool, draw a random half of it as batches, refill the freed half with new
chunks, repeat (the "refill half and mix" scheme of SAELens and dictionary_learning).
When the source runs dry the rest of the pool is served shuffled.

Every row the source yields is served exactly once per pass: rows only leave the pool by
being served, and a half that does not divide into whole batches leaves its remainder in
the pool for the next draw. Only the very last batch of a pass can be short (dropped with
``drop_last``). The pool is one preallocated ``[capacity, d_in]`` tensor; a draw copies half
of it once.

What it leaves out: producing the chunks (``harvest``, or an on-disk ``cache``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from ..utils.checks import check_int


class ShufflingBuffer:
    """Iterate to get ``[batch_size, d_in]`` batches; each iteration is one pass over ``source``.

    ``source`` is an iterable of ``[n, d_in]`` chunks. Iterating the buffer again iterates
    ``source`` again, so pass a re-iterable source (a list, an ``ActivationCache``) for
    several epochs; a generator gives one pass. The order is a function of ``seed`` and the
    pass number.
    """

    def __init__(
        self,
        source: Iterable[Tensor],
        capacity: int,
        batch_size: int,
        *,
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        check_int("capacity", capacity)
        check_int("batch_size", batch_size)
        if capacity < 2 * batch_size:
            raise ValueError(
                f"capacity={capacity} must hold at least two batches (2 * batch_size = {2 * batch_size}) "
                "so that half of it can be served while the other half mixes"
            )
        self.source = source
        self.capacity = capacity
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.dtype = dtype
        self.passes = 0

    def _batches(self, rows: Tensor) -> Iterator[Tensor]:
        for start in range(0, rows.shape[0], self.batch_size):
            batch = rows[start : start + self.batch_size]
            if batch.shape[0] == self.batch_size or not self.drop_last:
                yield batch

    def __iter__(self) -> Iterator[Tensor]:
        generator = torch.Generator().manual_seed(self.seed + self.passes)
        self.passes += 1
        chunks = iter(self.source)
        pool: Tensor | None = None  # [capacity, d_in], allocated from the first chunk
        pending: Tensor | None = None  # rows of the current chunk not yet in the pool
        n = 0  # rows in the pool
        exhausted = False
        while True:
            while n < self.capacity and not exhausted:
                if pending is None or pending.shape[0] == 0:
                    pending = next(chunks, None)
                    if pending is None:
                        exhausted = True
                        break
                    if pending.dim() != 2:
                        raise ValueError(f"source chunks must be [n, d_in], got {tuple(pending.shape)}")
                    pending = pending.to(self.device, self.dtype or pending.dtype)
                    if pool is None:
                        pool = pending.new_empty(self.capacity, pending.shape[1])
                    elif pending.shape[1] != pool.shape[1]:
                        raise ValueError(f"source chunk has d_in={pending.shape[1]}, earlier chunks {pool.shape[1]}")
                take = min(self.capacity - n, pending.shape[0])
                pool[n : n + take] = pending[:take]
                pending = pending[take:]
                n += take
            if pool is None or n == 0:
                return
            order = torch.randperm(n, generator=generator).to(self.device)
            if exhausted:
                yield from self._batches(pool[order])
                return
            n_out = (n // 2) // self.batch_size * self.batch_size  # whole batches only
            served, kept = order[:n_out], order[n_out:]
            yield from self._batches(pool[served])
            pool[: n - n_out] = pool[kept]  # advanced indexing copies first, so this is safe
            n -= n_out
