"""Starting the process group: the backend follows the device, the timeout bounds every wait.

``torchrun`` (or any launcher) sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``; ``join`` starts the default process group from them, or reuses the one the
caller already started. Gloo on CPU, NCCL on CUDA (one GPU per process, ``LOCAL_RANK``).
NCCL is written for but untested: the machine this was built on has no GPU.

The timeout is what turns a dead peer into an error: a collective that waits longer than
``timeout_s`` raises on every surviving rank instead of hanging (gloo usually fails at
once, when the dead rank's sockets close).

What it leaves out: what travels over the group (``reduction.py``, ``expert.py``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA tensors, ``gloo`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def join(device: torch.device, timeout_s: float):
    """The default process group, started from the launcher's environment if need be."""
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; parallel training needs it")
    if dist.is_initialized():
        return dist.group.WORLD
    missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(
            f"parallel training needs a launcher that sets {', '.join(missing)}: start it with "
            "`torchrun --nproc-per-node N -m switch_sae train ...` (or set the variables yourself)"
        )
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=timeout_s))
    return dist.group.WORLD


def local_device(device: str) -> str:
    """``device`` for this process: ``cuda`` becomes ``cuda:<LOCAL_RANK>`` (one GPU per process)."""
    if device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block before the others: it fills a shared cache (e.g. a model converted on
    first use) that the others then read instead of writing it at the same time."""
    parallel = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if parallel and dist.get_rank() != 0:
        dist.barrier()
    yield
    if parallel and dist.get_rank() == 0:
        dist.barrier()
