"""Checkpoints and saved SAEs of an expert-parallel run: a shard per process, one manifest.

Every process writes its own files (model shard, optimiser state of its parameters, its
RNG) into ``rank_<r>/`` of the checkpoint's hidden staging folder; their digests are
gathered to rank 0, which writes the manifest (with the world size) and renames the folder
into place: the same atomic publish as a one-process checkpoint (``training.checkpoint``).
A saved SAE is staged and renamed the same way, with ``shards.json`` as its manifest
(``models.sharded``), so ``SAE.load`` in one process assembles the whole SAE.

Resuming reads ``rank_<r>/`` of the newest intact checkpoint and needs the world size that
wrote it: the optimiser state is per shard. The folders live on a file system every
process sees (one machine, or a shared one across machines).

What it leaves out: the one-process format (``training.checkpoint``, ``models.base``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..models.base import SAE
from ..models.sharded import EXPERT_PARAMETERS, SHARDS_FILE, rank_folder, shards_manifest
from ..training.checkpoint import (
    MANIFEST,
    CheckpointError,
    digests,
    install_folder,
    publish,
    staging_folder,
    step_folder,
    write_files,
)
from ..utils.io import read_json_object
from ..utils.io import atomic_write_json


def save_sharded_checkpoint(root: str | Path, step: int, model: SAE, optimizer: torch.optim.Optimizer,
                            tensors: dict[str, Tensor], state: dict[str, Any], keep: int, group) -> Path:
    """Every process writes its shard of checkpoint ``step``; rank 0 publishes it."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    staging = staging_folder(root, step)
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # debris of a crash mid-write
    dist.barrier(group)
    mine = staging / rank_folder(rank)
    write_files(mine, model, optimizer, tensors, state)
    every = [None] * world
    dist.all_gather_object(every, digests(mine, prefix=f"{rank_folder(rank)}/"), group=group)
    if rank == 0:
        publish(root, step, {name: digest for files in every for name, digest in files.items()}, keep, world)
    dist.barrier(group)
    return Path(root) / step_folder(step)


def checkpoint_files(path: str | Path, rank: int, world: int, sharded: bool) -> Path:
    """The folder of the verified checkpoint ``path`` that holds ``rank``'s files, after checking
    that it was written the way it is being resumed (sharded by ``world`` processes, or not)."""
    path = Path(path)
    written_by = read_json_object(path / MANIFEST).get("world_size")
    if sharded and written_by == world:
        return path / rank_folder(rank)
    if not sharded and written_by is None:
        return path
    who = f"{written_by} expert-parallel processes (a shard each)" if written_by else "a run without expert parallelism"
    now = f"{world} expert-parallel processes" if sharded else "a run without expert parallelism"
    raise CheckpointError(f"checkpoint {path} was written by {who} and cannot be resumed by {now}; "
                          "resume with the --parallel setting and torchrun --nproc-per-node it was written with")


def save_sharded_sae(model: SAE, directory: str | Path, group) -> Path:
    """Every process saves its shard of ``model`` into ``directory``; rank 0 writes ``shards.json``
    and renames the staged folder into place."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    directory = Path(directory)
    staging = directory.parent / f".{directory.name}.tmp"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier(group)
    model.save(staging / rank_folder(rank))
    dist.barrier(group)
    if rank == 0:
        present = [name for name in EXPERT_PARAMETERS if getattr(model, name, None) is not None]
        atomic_write_json(shards_manifest(world, present), staging / SHARDS_FILE)
        install_folder(staging, directory)
    dist.barrier(group)
    return directory
