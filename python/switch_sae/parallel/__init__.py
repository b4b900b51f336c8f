"""Training across processes with ``torch.distributed``: data parallel for every SAE, expert
parallel for Switch SAEs.

    torchrun --nproc-per-node 4 -m switch_sae train switch --parallel expert ...
    Trainer(sae, TrainConfig(..., parallel="data"))   # in each process torchrun started

Modules: ``group`` (starting the process group: gloo on CPU, NCCL on CUDA, with a timeout),
``strategy`` (what a training step does per mode), ``reduction`` (global batch statistics,
gradient sums, the global gradient norm), ``alltoall`` (the differentiable all-to-all and
its byte counter), ``expert`` (the expert-parallel exchange and sharding), ``checkpoint``
(a shard per process, one manifest).

Guarantee: with the same global batches, data- and expert-parallel training give the
parameters, losses (balance loss and AuxK included) and dead-latent counters of
one-process training, up to float reduction order; uneven, empty and idle splits included.
"""

from .expert import ExpertExchange, shard_experts_
from .strategy import MODES, DataParallel, ExpertParallel, SingleProcess, start

__all__ = ["MODES", "DataParallel", "ExpertExchange", "ExpertParallel", "SingleProcess", "shard_experts_", "start"]
