"""How a training step spans processes: ``SingleProcess``, ``DataParallel``, ``ExpertParallel``.

The ``Trainer`` asks its strategy for everything that depends on the number of processes,
so its step reads the same for all three:

    n_tokens       tokens of the global batch (each process passes its own slice)
    whole_batch    the global batch, for the first step's input scale and geometric median
    scope          the batch scope of the losses (``models.batch_scope``): shares of global averages
    reduce         gradients of replicated parameters summed over processes
    clip           the global gradient norm, clipped
    fired          latents that fired anywhere, for the dead-latent counters
    shares         metric shares summed into the batch's values; only rank 0 logs and prints
    any_process    a stop request (Ctrl-C) seen anywhere, so every process stops after the same step
    checkpoints    one checkpoint (rank 0 writes it) or a shard per process (expert parallel)

Data parallel: every parameter is replicated; ``batch_size`` stays the global batch and each
process trains on its slice. Because each loss is the process's share of the global loss,
the summed gradients are the single-process gradients of the same global batch, and so,
up to float reduction order, is the whole run (uneven slices and empty ones included).
Expert parallel (Switch SAEs): the same over tokens, plus each process holds ``E / W``
experts and tokens travel to them (``expert.py``).

What it leaves out: the collectives (``reduction.py``, ``alltoall.py``), the exchange
(``expert.py``), the sharded files (``checkpoint.py``).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..models.base import SAE
from ..models.batch_scope import using
from ..models.sharded import EXPERT_PARAMETERS
from ..training import checkpoint
from . import group as process_group
from .checkpoint import checkpoint_files, save_sharded_checkpoint, save_sharded_sae
from .expert import shard_experts_
from .reduction import ProcessBatchScope, all_reduce, clip_grad_norm_, clip_to_norm_, gather_rows, sum_gradients_, sum_shares

MODES = ("none", "data", "expert")


class SingleProcess:
    """One process: the batch is all here and nothing is reduced."""

    mode = "none"
    rank, world, is_main = 0, 1, True

    def n_tokens(self, local: int) -> int:
        return local

    def whole_batch(self, x: Tensor) -> Tensor:
        return x

    def scope(self, n_tokens: int) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def reduce_gradients(self, model: SAE) -> None:
        pass

    def clip_grad_norm_(self, model: SAE, max_norm: float) -> Tensor:
        params = [p for p in model.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        clip_to_norm_(params, max_norm, total)
        return total

    def fired(self, fired: Tensor) -> Tensor:
        return fired

    def shares(self, shares: dict[str, Tensor]) -> dict[str, float]:
        return {name: t.item() for name, t in shares.items()}

    def any_process(self, flag: bool) -> bool:
        """``flag`` of any process (a Ctrl-C seen by one stops all after the same step)."""
        return flag

    def save_checkpoint(self, root: Path, step: int, model: SAE, optimizer, tensors: dict[str, Tensor],
                        state: dict[str, Any], keep: int) -> Path:
        return checkpoint.save_checkpoint(root, step, model, optimizer, tensors, state, keep)

    def checkpoint_folder(self, path: Path) -> Path:
        """The folder of checkpoint ``path`` holding this process's files."""
        return checkpoint_files(path, self.rank, self.world, sharded=False)

    def save_model(self, model: SAE, directory: Path) -> Path:
        return model.save(directory)

    def barrier(self) -> None:
        pass


class DataParallel(SingleProcess):
    """Replicated parameters, the batch split across processes, gradients summed."""

    mode = "data"

    def __init__(self, model: SAE, group) -> None:
        self.group, self.device = group, model.W_dec_flat.device
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.is_main = self.rank == 0
        with torch.no_grad():  # every replica starts from rank 0's parameters
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0, group=group)
        self.replicated = list(model.parameters())

    def n_tokens(self, local: int) -> int:
        return int(all_reduce(torch.tensor(local, dtype=torch.int64, device=self.device), self.group))

    def whole_batch(self, x: Tensor) -> Tensor:
        return gather_rows(x, self.group)

    def scope(self, n_tokens: int) -> contextlib.AbstractContextManager:
        return using(ProcessBatchScope(self.group, n_tokens))

    def reduce_gradients(self, model: SAE) -> None:
        sum_gradients_(self.replicated, self.group)

    def fired(self, fired: Tensor) -> Tensor:
        return all_reduce(fired.to(torch.int32), self.group, dist.ReduceOp.MAX).bool()

    def shares(self, shares: dict[str, Tensor]) -> dict[str, float]:
        return sum_shares(shares, self.group)

    def any_process(self, flag: bool) -> bool:
        return bool(all_reduce(torch.tensor(flag, dtype=torch.int32, device=self.device), self.group, dist.ReduceOp.MAX))

    def save_checkpoint(self, root, step, model, optimizer, tensors, state, keep) -> Path:
        # The replicas are identical: one copy suffices.
        path = super().save_checkpoint(root, step, model, optimizer, tensors, state, keep) if self.is_main else None
        self.barrier()
        return path or Path(root) / checkpoint.step_folder(step)

    def save_model(self, model: SAE, directory: Path) -> Path:
        if self.is_main:
            model.save(directory)
        self.barrier()
        return directory

    def barrier(self) -> None:
        dist.barrier(self.group)


class ExpertParallel(DataParallel):
    """Data parallel over tokens, plus ``n_experts / W`` experts per process (Switch SAEs)."""

    mode = "expert"

    def __init__(self, model: SAE, group) -> None:
        super().__init__(model, group)
        self.exchange = shard_experts_(model, self.rank, self.world, group)
        self.sharded = [p for name, p in model.named_parameters() if name in EXPERT_PARAMETERS]
        self.replicated = [p for name, p in model.named_parameters() if name not in EXPERT_PARAMETERS]

    def clip_grad_norm_(self, model: SAE, max_norm: float) -> Tensor:
        return clip_grad_norm_(self.replicated, self.sharded, max_norm, self.group)

    def save_checkpoint(self, root, step, model, optimizer, tensors, state, keep) -> Path:
        return save_sharded_checkpoint(root, step, model, optimizer, tensors, state, keep, self.group)

    def checkpoint_folder(self, path: Path) -> Path:
        return checkpoint_files(path, self.rank, self.world, sharded=True)

    def save_model(self, model: SAE, directory: Path) -> Path:
        return save_sharded_sae(model, directory, self.group)


def start(mode: str, model: SAE, timeout_s: float) -> SingleProcess:
    """The strategy for ``mode`` ('none', 'data', 'expert'), joining the process group if needed.

    Call it before building the optimiser: expert parallelism replaces the expert parameters
    by this process's slices.
    """
    if mode not in MODES:
        raise ValueError(f"parallel must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return SingleProcess()
    group = process_group.join(model.W_dec_flat.device, timeout_s)
    return DataParallel(model, group) if mode == "data" else ExpertParallel(model, group)
