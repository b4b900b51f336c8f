"""Where a benchmark ran: the machine and the library versions, stored with every record.

What it leaves out: GPU details beyond the device name (CUDA benchmarks are not run on
this machine's default configuration).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import sys
from pathlib import Path

import torch

PEER_DISTRIBUTIONS = ("sae-lens", "dictionary-learning", "transformer-lens")


def cpu_model() -> str:
    """The CPU's marketing name (``/proc/cpuinfo`` on Linux, ``platform`` elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    """CPU model, logical cores, torch threads, memory, OS, CPU ISA torch dispatches to, malloc."""
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = None
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(mem_gb, 1) if mem_gb else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "platform": platform.platform(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "malloc": preloaded_malloc() or "glibc",
    }


def preloaded_malloc() -> str | None:
    """The malloc library preloaded into this process (tcmalloc, jemalloc), if any. It keeps
    freed gradient buffers for the next step instead of returning them to the kernel, which
    zeroes fresh pages; it also hides a call's transient memory (measure.peak_memory)."""
    return next((lib for lib in os.environ.get("LD_PRELOAD", "").split(":") if "malloc" in Path(lib).name), None)


def dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def extension_built() -> str:
    """Modification time (UTC) of the loaded ``switch_sae._C`` binary: tells which build of
    the kernels a record timed while they are still being worked on."""
    path = Path(sys.modules["switch_sae._C"].__file__)
    return datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    """Versions of python, torch, switch_sae (whether its compiled ops are loaded, and which
    GEMM its CPU encoder runs), peers."""
    from switch_sae import __version__, ops

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "switch_sae": __version__, "switch_sae_extension": ops.HAS_EXTENSION,
             "switch_sae_extension_built": extension_built() if ops.HAS_EXTENSION else None,
             "switch_sae_cpu_encoder_gemm": ops.cpu_encoder_gemm()}
    for name in PEER_DISTRIBUTIONS:
        found[name] = dist_version(name)
    return found
