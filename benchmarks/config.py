"""What a benchmark run measures: shapes, which cases, and how hard to time them.

The defaults are the CPU-sized target shapes (d_in 512, batch 4096, k 32,
d_sae 2^16, n_experts 1/4/16/64); ``QUICK`` is a preset of tiny shapes that runs in
seconds, for smoke tests. What it leaves out: running anything (``runner.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from switch_sae.utils.checks import check_int_fields

CASES = ("train", "step", "memory", "gemm", "ops", "optimiser", "harvest")


@dataclass
class BenchConfig:
    """One benchmark run. Every case of a run shares these shapes."""

    d_in: int = 512
    """Width of the activations being reconstructed."""
    d_sae: int = 65536
    """Total number of features; each Switch config splits it into n_experts experts."""
    batch: int = 4096
    """Tokens per training step (and per op call)."""
    k: int = 32
    """Active features per token."""
    n_experts: tuple[int, ...] = (1, 4, 16, 64)
    """Expert counts to sweep; each must divide d_sae and leave at least k features per expert."""
    cases: tuple[str, ...] = CASES
    """Which case families to run: train (training steps of every implementation), step (our training step alone: with gemm and ops, what the roofline ratios need), memory (peak memory of our step and the dense-and-mask one at the largest n_experts for batch/4, batch/2, batch), gemm (the routed encoder GEMM limit and the machine's GEMM rate), ops (per-op timings vs the reference ops), optimiser (each pass over the parameters after backward, and the whole update, with the decoder-gradient projection blocked and on the whole matrix), harvest (activation harvest rate)."""
    peers: bool = True
    """Also time the dense TopK SAEs of sae-lens and dictionary-learning when they import."""
    peer_path: str = ""
    """Extra import path holding sae-lens / dictionary-learning (a `pip install --target` folder) when they cannot be installed next to this torch; the env var SWITCH_SAE_BENCH_PEERS is used when this is empty."""
    fused_adam: bool = True
    """Step every implementation with torch's fused Adam (one pass per parameter; on CPU several times faster than the default multi-tensor Adam, whose passes over the parameters dominate a routed step); --no-fused-adam for the default."""
    warmup: int = 2
    """Untimed calls before timing (first-call allocations, thread-pool start-up)."""
    repeats: int = 7
    """Timed calls per case (fewer if max_seconds runs out first, but never fewer than 3)."""
    max_seconds: float = 60.0
    """Soft time budget per case for the timed calls."""
    validate_batch: int = 128
    """Tokens used to check each implementation against the reference before timing it."""
    subprocess: bool = True
    """Run each case in a fresh Python process, so its memory high-water mark is its own."""
    out: str = "benchmarks/results"
    """Folder for latest.json and the PNG plots."""
    quick: bool = False
    """Use the QUICK preset (tiny shapes, few repeats) for every option not given explicitly."""
    seed: int = 0
    """Seed for weights and inputs."""
    threads: int = 0
    """torch threads for every case (0 keeps torch's default, one per core)."""
    malloc: str = ""
    """A malloc library to preload (LD_PRELOAD) into every case's process, e.g. Debian's /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4: unlike glibc's malloc it keeps freed gradient buffers for the next call, so they are not zeroed again page by page. Empty keeps the environment's malloc."""

    def __post_init__(self) -> None:
        check_int_fields(self, "d_in", "d_sae", "batch", "k", "repeats", "validate_batch")
        if self.threads < 0:
            raise ValueError(f"threads must be zero (torch's default) or more, got {self.threads!r}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be zero or more, got {self.warmup!r}")
        if self.malloc and not self.subprocess:
            raise ValueError("malloc is preloaded into each case's process: it needs subprocess=True")
        if self.malloc and not Path(self.malloc).is_file():
            raise ValueError(f"malloc={self.malloc!r} is not a file (give the path of a shared library)")
        if self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds!r}")
        self.n_experts = tuple(self.n_experts)
        self.cases = tuple(self.cases)
        if not self.n_experts:
            raise ValueError("n_experts must list at least one expert count")
        for n in self.n_experts:
            if n < 1 or self.d_sae % n or self.d_sae // n < self.k:
                raise ValueError(
                    f"n_experts={n} does not fit d_sae={self.d_sae} and k={self.k}: it must divide "
                    "d_sae and leave each expert at least k features"
                )
        unknown = set(self.cases) - set(CASES)
        if unknown:
            raise ValueError(f"cases has unknown entries {sorted(unknown)}; choose from {CASES}")
        if self.validate_batch > self.batch:
            raise ValueError(f"validate_batch={self.validate_batch} exceeds batch={self.batch}")


QUICK = dict(
    d_in=32, d_sae=256, batch=256, k=4, n_experts=(1, 4), warmup=1, repeats=3,
    max_seconds=5.0, validate_batch=32, threads=1,
)
"""Tiny shapes for a smoke test: a whole run takes seconds. One thread, because at these
sizes a second thread only adds synchronisation, which a busy machine makes erratic."""
