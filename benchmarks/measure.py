"""How a benchmark measures: validation against a reference, wall-clock timing, peak memory.

Timing: ``warmup`` untimed calls, then up to ``repeats`` individually timed calls
(``time.perf_counter``), reported as median with quartiles, min and max, because the
machine may be shared and a mean would be dragged by the slowest outlier.

Memory: the process's resident-set high-water mark (``VmHWM``) during one call, minus the
resident set just before it, after freed heap pages have been returned to the OS
(``malloc_trim``) and the high-water mark reset (``/proc/self/clear_refs``). So
``peak_mb`` is the transient memory of one call above the resting state (weights,
optimiser state, inputs, and the previous step's gradients, which a step frees with
``zero_grad(set_to_none=True)`` before making new ones), and ``resting_mb`` is that
resting state. It is
exact only when the case runs alone in its process, which the runner does by default,
and only under glibc's malloc: a preloaded one (tcmalloc, jemalloc) keeps freed buffers
resident for reuse, so the high-water mark no longer shows one call's transient memory
and ``peak_mb`` is None. Linux only; elsewhere the memory fields are None.

What it leaves out: which functions are measured (``cases_*.py``).
"""

from __future__ import annotations

import ctypes
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from .machine import preloaded_malloc


class ValidationError(AssertionError):
    """An implementation disagrees with the reference: its timing would be meaningless."""


def check_close(what: str, got: Tensor, want: Tensor, *, rtol: float = 1e-4, atol: float = 1e-5) -> float:
    """Raise ``ValidationError`` unless ``got`` matches ``want``; return the max abs error.

    The tolerance is scaled by the reference's magnitude so that sums over many features
    (float32 accumulation in another order) do not fail spuriously.
    """
    if got.shape != want.shape:
        raise ValidationError(f"{what}: shape {tuple(got.shape)} != reference {tuple(want.shape)}")
    got, want = got.detach().double(), want.detach().double()
    if not torch.isfinite(got).all():
        raise ValidationError(f"{what}: result has NaN or inf values")
    err = (got - want).abs().max().item() if got.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    if err > atol + rtol * scale:
        raise ValidationError(f"{what}: max abs error {err:.3g} vs reference (scale {scale:.3g})")
    return err


def time_calls(fn: Callable[[], object], warmup: int, repeats: int, max_seconds: float) -> dict:
    """Median and spread (ms) of ``fn()``; stops early past ``max_seconds`` with >= 3 samples."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < repeats:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if len(samples) >= 3 and time.perf_counter() - started > max_seconds:
            break
    return summarize(samples)


def summarize(samples_ms: list[float]) -> dict:
    """``median_ms``, quartiles, ``min_ms``, ``max_ms`` and ``repeats`` of a list of times."""
    if len(samples_ms) >= 2:
        q25, _, q75 = statistics.quantiles(samples_ms, n=4, method="inclusive")
    else:
        q25 = q75 = samples_ms[0]
    return {
        "median_ms": statistics.median(samples_ms),
        "q25_ms": q25,
        "q75_ms": q75,
        "min_ms": min(samples_ms),
        "max_ms": max(samples_ms),
        "repeats": len(samples_ms),
    }


_STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", _STATUS.read_text()).group(1))


def _trim_heap() -> None:
    # No gc.collect(): tensors are freed by reference counting, and a full collection of a
    # process that imported transformers takes ~0.4 s per call.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed pages may stay resident
        pass


def peak_memory(fn: Callable[[], object]) -> dict:
    """``peak_mb`` (above resting) and ``resting_mb`` of one call of ``fn``, or None values."""
    if not _STATUS.exists():
        return {"peak_mb": None, "resting_mb": None}
    if preloaded_malloc():  # see the module docstring
        return {"peak_mb": None, "resting_mb": _status_kb("VmRSS") / 1024}
    _trim_heap()
    resting = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return {"peak_mb": None, "resting_mb": resting / 1024}
    fn()
    return {"peak_mb": (_status_kb("VmHWM") - resting) / 1024, "resting_mb": resting / 1024}
