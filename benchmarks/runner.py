"""Plan a benchmark run, run each case (in a fresh process by default), write the results.

``run(cfg)`` returns the list of records and writes ``<out>/latest.json`` (that list),
``<out>/summary.md`` (the tables of ``report.py``) and the PNG plots of ``plot.py``.
Training steps of sae-lens / dictionary-learning run with ``peer_path`` first on the
import path, so they can live in a separate ``pip install --target`` folder when their
dependencies (an older TransformerLens, a different torch) clash with this environment.

What it leaves out: what each case measures (``cases_*.py``, ``worker.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import switch_sae
from switch_sae.cli.args import add_dataclass_arguments, dataclass_from_args, explicit_fields
from switch_sae.utils.io import atomic_write, atomic_write_json
from . import report, roofline
from .config import QUICK, BenchConfig
from .plot import plot_all
from .worker import RESULT_MARK, run_case

PEERS = ("saelens_topk", "dictlearning_topk")
CASE_TIMEOUT_S = 3600


def plan(cfg: BenchConfig) -> list[dict]:
    """Case specs of a run, in the order they will run."""
    common = {**dataclasses.asdict(cfg), "sweep": cfg.n_experts, "gemm_peak_size": 128 if cfg.quick else 2048}
    specs = []
    if "train" in cfg.cases or "step" in cfg.cases:
        impls = ("switch_sae", "dense_mask_reference") if "train" in cfg.cases else ("switch_sae",)
        for n in cfg.n_experts:
            for impl in impls:
                specs.append({**common, "family": "train", "name": impl, "impl": impl, "variant": None, "n_experts": n})
    if "train" in cfg.cases and cfg.peers:
        for impl in PEERS:
            specs.append({**common, "family": "train", "name": impl, "impl": impl,
                          "variant": "width_matched", "n_experts": None})
            for n in cfg.n_experts:
                if n > 1:  # at n_experts = 1 one expert's width is the full width
                    specs.append({**common, "family": "train", "name": impl, "impl": impl,
                                  "variant": "flop_matched", "n_experts": n, "d_sae": cfg.d_sae // n})
    if "memory" in cfg.cases:
        # The full batch is a "train" case already, but under a preloaded malloc that case
        # cannot see its peak (measure.py): then the sweep measures it, at every n_experts.
        sweep = [(batch, max(cfg.n_experts)) for batch in (cfg.batch // 4, cfg.batch // 2)]
        if cfg.malloc:
            sweep += [(cfg.batch, n) for n in cfg.n_experts]
        for batch, n in sweep:
            for impl in ("switch_sae", "dense_mask_reference"):
                specs.append({**common, "family": "train", "name": impl, "impl": impl, "variant": "memory_sweep",
                              "n_experts": n, "batch": batch, "warmup": 1, "repeats": 1,
                              "validate_batch": min(cfg.validate_batch, batch)})
    for family in ("gemm", "ops", "optimiser", "harvest"):
        if family in cfg.cases:
            specs.append({**common, "family": family, "name": family, "variant": None, "n_experts": None})
    return specs


def peer_path(cfg: BenchConfig) -> str:
    return cfg.peer_path or os.environ.get("SWITCH_SAE_BENCH_PEERS", "")


def run_in_subprocess(spec: dict, extra_path: str, malloc: str = "") -> list[dict]:
    """Run ``spec`` in a fresh interpreter that imports these same benchmarks and switch_sae
    (with ``malloc`` preloaded, when given)."""
    roots = (str(Path(__file__).resolve().parents[1]), str(Path(switch_sae.__file__).resolve().parents[1]))
    paths = [p for p in (extra_path, *roots, os.environ.get("PYTHONPATH", "")) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    if malloc:
        env["LD_PRELOAD"] = malloc
    proc = subprocess.run([sys.executable, "-m", "benchmarks.worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=CASE_TIMEOUT_S)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return [{"name": spec["name"], "variant": spec.get("variant"), "n_experts": spec.get("n_experts"),
             "status": "failed", "error": f"worker exited with code {proc.returncode}: " + " | ".join(tail)}]


def run(cfg: BenchConfig, *, echo=print) -> list[dict]:
    """Run every planned case, write results into ``cfg.out``, and return the records."""
    records: list[dict] = []
    specs = plan(cfg)
    for i, spec in enumerate(specs, 1):
        label = f"{spec['name']} {spec.get('variant') or ''} n_experts={spec.get('n_experts')}"
        echo(f"[{i}/{len(specs)}] {label}")
        if cfg.subprocess:
            extra = peer_path(cfg) if spec.get("impl") in PEERS else ""
            # The memory sweep measures transient memory, which only glibc's malloc shows.
            malloc = "" if spec.get("variant") == "memory_sweep" else cfg.malloc
            new = run_in_subprocess(spec, extra, malloc)
        else:
            new = run_case(spec)
        for r in new:
            status = f"{r['median_ms']:.4g} ms" if r.get("status") == "ok" else f"{r['status']}: {r.get('error', '')}"
            echo(f"    {r['name']} {r.get('variant') or ''} n_experts={r.get('n_experts')}: {status}")
        records.extend(new)
        atomic_write_json(records, Path(cfg.out) / "latest.json")  # a long run keeps what it measured
    write_results(records, Path(cfg.out))
    return records


def summary(records: list[dict]) -> str:
    peers = {r["name"]: r["versions"].get("sae-lens" if r["name"] == "saelens_topk" else "dictionary-learning")
             for r in records if r["name"] in PEERS and r.get("status") == "ok"}
    return "\n\n".join([
        "# switch_sae benchmark results",
        f"Machine: {report.machine_line(records)}" + (f"; peers: {peers}" if peers else ""),
        "## Ratios against the targets", report.ratio_table(records),
        "## Roofline: measured against the machine's limits", report.roofline_table(records),
        "## Roofline on paper: a GPU at the same shapes", report.gpu_roofline_table(records),
        "## Training step by phase", report.phase_table(records),
        "## Optimiser: every pass over the parameters after backward", report.optimiser_table(records),
        "## Peak memory of a step against batch", report.memory_table(records),
        "## All records", report.records_table(records),
    ]) + "\n"


def write_results(records: list[dict], folder: Path) -> None:
    roofline.annotate(records)
    atomic_write_json(records, folder / "latest.json")
    text = summary(records)
    atomic_write(folder / "summary.md", lambda tmp: Path(tmp).write_text(text))
    plot_all(records, folder)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """``BenchConfig`` from parsed options; ``--quick`` fills the options not given with QUICK."""
    if getattr(args, "quick", False):
        given = explicit_fields(BenchConfig, args)
        return BenchConfig(**{**QUICK, **given})
    return dataclass_from_args(BenchConfig, args)


def parse_config(argv: list[str] | None, prog: str | None = None) -> BenchConfig:
    """``BenchConfig`` from command-line words: one option per field, ``--help`` lists them.
    A malformed option exits as argparse does; a value the config refuses raises ValueError."""
    parser = argparse.ArgumentParser(prog=prog, description="Benchmarks: validate every implementation against "
                                     "the reference, then time it; writes latest.json, summary.md and plots.")
    add_dataclass_arguments(parser, BenchConfig)
    return config_from_args(parser.parse_args(argv))


def run_benchmarks(cfg: BenchConfig) -> list[dict]:
    """Run the benchmarks, print the tables, return the records."""
    records = run(cfg)
    print(json.dumps(records, indent=1))
    print(summary(records))
    print(f"results: {Path(cfg.out) / 'latest.json'}")
    return records


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``benchmarks/run.py``: parse, run, print; exit code 2 (one line) for a refused option."""
    try:
        cfg = parse_config(argv, prog)
    except ValueError as err:
        print(f"{prog or 'run.py'}: error: {err}", file=sys.stderr)
        return 2
    run_benchmarks(cfg)
    return 0
