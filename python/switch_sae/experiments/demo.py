"""``switch-sae demo``: the main job, end to end, on one command.

Harvest activations from a language model (by default the embedded SmolLM2-135M on the
Python documentation, so no internet is needed), train three SAEs on the very same
batches, evaluate them on the very same held-out tokens, and report:

- ``topk``: a TopK SAE with ``d_sae`` features and ``k`` active per token (the baseline);
- ``switch-flop``: a Switch SAE whose ``n_experts`` experts are each as wide as the
  baseline (FLOP-matched: the same encoder FLOPs per token, ``n_experts`` times the features);
- ``switch-width``: a Switch SAE splitting the baseline's ``d_sae`` over ``n_experts``
  experts (width-matched: the same features, ``n_experts`` times fewer encoder FLOPs).

The run folder (``--out``, default ``runs/demo-<time>``) holds ``demo_config.json``, one
subfolder per SAE (``sae/`` weights, ``checkpoints/``, ``metrics.jsonl``, ``eval.json``),
``results.json``, ``report.md`` and ``analysis/`` (plots). Ctrl-C leaves checkpoints;
``--resume --out <run folder>`` carries on where it stopped (the activation cache, every
trainer and finished SAEs are all resumed or reused).

Sizes left unset come from a preset: ``cpu`` (finishes in under 10 minutes on a 2-core
CPU) or ``paper`` (the paper's GPT-2 setting, for a GPU); ``auto`` picks ``paper`` for a
named model on a GPU and ``cpu`` otherwise.

What it leaves out: the pieces themselves (``activations``, ``training``, ``evals``); the
table and report text live in ``demo_report.py``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..activations import hook_d_in
from ..activations.pipeline import DataConfig, activation_source, check_inputs, eval_tokens, load_language_model, training_batches
from ..evals import flops, geometry
from ..evals.evaluate import evaluate_many
from ..models import SAE, TopKSAEConfig
from ..training import TrainConfig, Trainer
from ..utils.checks import check_int_fields
from ..utils.io import atomic_write_json
from ..utils.runs import config_clashes, require_empty

CONFIG_FILE = "demo_config.json"
# Fields that may differ between a run and its resumption (they do not change the result).
RESUMABLE = ("resume", "progress", "keep_activations", "out")
PRESET_FIELDS = ("context_size", "train_tokens", "epochs", "eval_contexts", "batch_size", "harvest_batch",
                 "d_sae", "n_experts", "k", "lr_scale")
PRESETS: dict[str, dict[str, Any]] = {
    # A 2-core CPU: one pass over 262,144 harvested tokens (harvesting at ~2,000 tokens/s is
    # the slow part), every SAE scored on 64 held-out contexts (8,128 scored tokens, enough to
    # tell a dead latent of the 4096-wide SAE from one not yet seen), the lr raised for the
    # short run.
    "cpu": dict(context_size=128, train_tokens=262_144, epochs=1, eval_contexts=64, batch_size=512,
                harvest_batch=8, d_sae=4096, n_experts=8, k=32, lr_scale=3.0),
    # The paper's setting: GPT-2 small, 8192-token batches, 24576 features, k=32, 8 experts.
    "paper": dict(context_size=128, train_tokens=50_000_000, epochs=1, eval_contexts=256, batch_size=8192,
                  harvest_batch=64, d_sae=24576, n_experts=8, k=32, lr_scale=1.0),
}


@dataclass
class DemoConfig(DataConfig):
    """The main job: TopK vs FLOP-matched and width-matched Switch SAEs on one model's activations."""

    context_size: int | None = None
    """Tokens per context (cpu and paper preset: 128)."""
    train_tokens: int | None = None
    """Activations harvested for training (cpu: 262144, paper: 50M)."""
    epochs: int | None = None
    """Passes over the training activations (cpu and paper: 1)."""
    eval_contexts: int | None = None
    """Held-out contexts every SAE is evaluated on (cpu: 64, paper: 256)."""
    batch_size: int | None = None
    """Tokens per training step (cpu: 512, paper: 8192)."""
    harvest_batch: int | None = None
    """Contexts per language-model forward pass (cpu: 8, paper: 64)."""
    cache_activations: bool | None = None
    """Harvest the training activations once into the run folder and reuse them for every SAE and pass; None: yes for the cpu preset, no for paper (50M activations would not fit; each SAE re-harvests)."""
    preset: Literal["auto", "cpu", "paper"] = "auto"
    """Where unset sizes come from: cpu (under 10 min on a 2-core CPU), paper (the paper's GPT-2 setting), auto (paper for a named model on a GPU, else cpu)."""
    d_sae: int | None = None
    """Features of the TopK baseline, and of the width-matched Switch SAE (cpu: 4096, paper: 24576)."""
    n_experts: int | None = None
    """Experts of both Switch SAEs (cpu and paper: 8)."""
    k: int | None = None
    """Active features per token for every SAE (cpu and paper: 32)."""
    lr_scale: float | None = None
    """Multiplier of the default learning rate 2e-4 / sqrt(width / 2^14) (TrainConfig.lr), applied to every SAE (cpu: 3, for a short run; paper: 1)."""
    keep_activations: bool = False
    """Keep the activation cache in the run folder after a successful run."""
    tsne: bool = False
    """Also draw t-SNE plots of the feature directions (slow)."""
    out: str = ""
    """Run folder; empty means runs/demo-<date>-<time>."""
    resume: bool = False
    """Continue the run in --out (after Ctrl-C or a crash) instead of starting a new one."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int_fields(self, "d_sae", "n_experts", "k", optional=True)
        if self.preset not in PRESETS and self.preset != "auto":
            raise ValueError(f"preset must be auto, cpu or paper, got {self.preset!r}")
        if self.resume and not self.out:
            raise ValueError("resume needs out: pass --out <the run folder to continue>")
        if self.lr_scale is not None and not 0 < self.lr_scale < float("inf"):
            raise ValueError(f"lr_scale must be a finite positive number, got {self.lr_scale}")

    def resolved(self) -> DemoConfig:
        """A copy with device, preset, hook, run folder and every unset size filled in, checked."""
        device = self.resolved_device()
        preset = self.preset
        if preset == "auto":
            preset = "paper" if self.model != "default" and device.startswith("cuda") else "cpu"
        filled = {name: PRESETS[preset][name] for name in PRESET_FIELDS if getattr(self, name) is None}
        cfg = dataclasses.replace(
            self, device=device, preset=preset, hook_name=self.resolved_hook(),
            cache_activations=preset == "cpu" if self.cache_activations is None else self.cache_activations,
            out=self.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}", **filled,
        )
        if cfg.d_sae % cfg.n_experts:
            raise ValueError(f"n_experts={cfg.n_experts} must divide d_sae={cfg.d_sae} (the width-matched Switch SAE splits it)")
        if cfg.k > cfg.d_sae // cfg.n_experts:
            raise ValueError(f"k={cfg.k} exceeds the width-matched experts' d_expert={cfg.d_sae // cfg.n_experts}; lower k or raise d_sae")
        cfg.steps()  # checks that there is at least one batch
        return cfg


def log(message: str) -> None:
    """A stage message that does not break tqdm bars."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


# ------------------------------------------------------------------ run folder and inputs


def resumed_config(cfg: DemoConfig) -> DemoConfig:
    """The saved config of the run in ``cfg.out``, with the resumable fields taken from ``cfg``.

    Other fields the user set must agree with the saved run (so ``--resume --out DIR`` alone
    is enough, and a changed size is an error rather than a silently different run).
    """
    saved_path = Path(cfg.out) / CONFIG_FILE
    if not saved_path.is_file():
        raise FileNotFoundError(f"cannot resume: {saved_path} does not exist (is {cfg.out} a demo run folder?)")
    saved = DemoConfig(**json.loads(saved_path.read_text()))
    if clashes := config_clashes(saved, cfg, ignore=RESUMABLE, defaults=DemoConfig()):
        raise ValueError(f"cannot resume {cfg.out}: these options differ from the interrupted run (was, now): {clashes}")
    return dataclasses.replace(saved, **{name: getattr(cfg, name) for name in RESUMABLE})


def prepare_run_dir(cfg: DemoConfig) -> None:
    """Create a new run folder holding the resolved config."""
    out = Path(cfg.out)
    require_empty(out, "pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(dataclasses.asdict(cfg), out / CONFIG_FILE)


# ------------------------------------------------------------------ the three SAEs


def make_saes(cfg: DemoConfig, d_in: int) -> dict[str, SAE]:
    """The TopK baseline and its FLOP-matched and width-matched Switch counterparts."""
    meta = {"hook_name": cfg.hook_name, "model_name": cfg.model, "device": cfg.device}
    return flops.make_saes(TopKSAEConfig(d_in=d_in, d_sae=cfg.d_sae, k=cfg.k, **meta), cfg.n_experts, seed=cfg.seed)


def train_one(cfg: DemoConfig, name: str, sae: SAE, source: Any, run_dir: Path) -> SAE:
    """Train (or resume, or reuse) one SAE in ``run_dir``; returns the trained SAE."""
    final = run_dir / "sae"
    if (final / "model.safetensors").is_file():
        log(f"{name}: already trained, reusing {final}")
        return SAE.load(final, device=cfg.device)
    paper_lr = TrainConfig(total_steps=1).peak_lr(sae.encoder_width)
    train_cfg = TrainConfig(total_steps=cfg.steps(), lr=cfg.lr_scale * paper_lr, seed=cfg.seed, run_dir=str(run_dir),
                            resume=cfg.resume, progress=cfg.progress)
    trainer = Trainer(sae, train_cfg)
    trainer.fit(training_batches(cfg, source))
    return SAE.load(final, device=cfg.device)


def training_speed(run_dir: Path, batch_size: int) -> dict[str, float]:
    """Median step time and tokens/s over the logged steps (the first, which initialises, excluded)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = sorted(r["tokens_per_s"] for r in rows[1:] or rows)
    median = rates[len(rates) // 2]
    return {"tokens_per_s": median, "step_ms": 1e3 * batch_size / median}


def summarise(name: str, sae: SAE, result: Any, speed: dict[str, float], cfg: DataConfig) -> dict[str, Any]:
    """One row of the comparison table."""
    load = result.expert_load
    return {
        "name": name,
        "architecture": sae.architecture,
        "d_sae": sae.d_sae,
        "n_experts": getattr(sae.cfg, "n_experts", 1),
        "k": getattr(sae.cfg, "k", None),
        "flops_per_token": flops.flop_count(sae).forward_total,
        "mse": result.mse,
        "fve": result.fve,
        "l0": result.l0,
        "unseen_fraction": result.unseen_fraction,
        "unseen_floor": result.unseen_floor,
        "dead_fraction": result.dead_fraction,
        "dead_source": result.dead_source,
        "loss_recovered": result.loss_recovered_zero,
        "loss_recovered_mean": result.loss_recovered_mean,
        "kl": result.kl,
        "expert_load_max": max(load) if load else None,
        "expert_load_min": min(load) if load else None,
        "duplicate_fraction": geometry.duplicate_fraction(geometry.nearest_neighbours(sae), 0.9),
        "tokens": cfg.steps() * cfg.batch_size,
        "batch_size": cfg.batch_size,
        **speed,
    }


# ------------------------------------------------------------------ evaluation


def evaluate_trained(cfg: DataConfig, lm: Any, tokens: Any, trained: dict[str, SAE], run_dirs: dict[str, Path]) -> list[dict[str, Any]]:
    """Evaluate every SAE of ``trained`` on the same held-out ``tokens``, running the model's
    clean and ablated passes once for all of them; writes ``eval.json`` and ``metrics.json``
    (what ``switch-sae analyze`` reads) into each run folder and returns the summary rows."""
    results = evaluate_many(trained, lm, tokens, cfg.resolved_hook(), batch_size=cfg.harvest_batch,
                            run_dirs=run_dirs, progress=cfg.progress)
    rows = []
    for name, result in results.items():
        result.save(run_dirs[name] / "eval.json")
        rows.append(summarise(name, trained[name], result, training_speed(run_dirs[name], cfg.batch_size), cfg))
        atomic_write_json(rows[-1], run_dirs[name] / "metrics.json")
    return rows


# ------------------------------------------------------------------ the whole job


@dataclass
class DemoResult:
    """What ``run_demo`` produced."""

    out: Path
    """The run folder."""
    rows: list[dict[str, Any]]
    """One summary row per SAE (the printed table)."""
    table: str
    """The comparison table as printed."""
    seconds: float
    """Wall time of this invocation."""


def prepare_demo(cfg: DemoConfig) -> DemoConfig:
    """Resolve the config, check the inputs exist and make (or reopen) the run folder.

    Everything a user can get wrong fails here, before any work, with ValueError or
    FileNotFoundError/FileExistsError naming the problem.
    """
    if cfg.resume:
        cfg = resumed_config(cfg)
        check_inputs(cfg)
        return cfg
    cfg = cfg.resolved()
    check_inputs(cfg)
    prepare_run_dir(cfg)
    return cfg


def run_demo(cfg: DemoConfig) -> DemoResult:
    """Run the main job (see the module docstring); prints the table and returns it."""
    return execute_demo(prepare_demo(cfg))


def execute_demo(cfg: DemoConfig) -> DemoResult:
    """The work of ``run_demo`` on a config returned by ``prepare_demo``."""
    from ..evals.report import analyze_runs
    from .demo_report import format_table, write_report

    start = time.perf_counter()
    out = Path(cfg.out)
    stages: dict[str, float] = {}

    def stage(name: str) -> None:
        stages[name] = round(time.perf_counter() - start, 1)
        log(f"[{time.perf_counter() - start:6.1f}s] {name}")

    stage(f"loading {cfg.model} model on {cfg.device} (run folder {out})")
    lm = load_language_model(cfg)
    tokens = eval_tokens(cfg, lm)
    d_in = hook_d_in(lm, cfg.hook_name)  # raises, naming the hook, if it does not exist
    stage(f"activations at {cfg.hook_name} (d_in={d_in}): {cfg.train_tokens} training tokens")
    source = activation_source(cfg, lm, d_in, out / "activations")
    saes = make_saes(cfg, d_in)
    trained = {}
    for i, (name, sae) in enumerate(saes.items(), 1):
        stage(f"training {i}/{len(saes)} {name}: d_sae={sae.d_sae}, experts={getattr(sae.cfg, 'n_experts', 1)}, "
              f"k={cfg.k}, {cfg.steps()} steps of {cfg.batch_size} tokens")
        trained[name] = train_one(cfg, name, sae, source, out / name)
    stage(f"evaluating on {tokens.numel()} held-out tokens ({cfg.eval_contexts} contexts)")
    rows = evaluate_trained(cfg, lm, tokens, trained, {name: out / name for name in trained})
    stage("plots and report")
    analyze_runs([out / name for name in trained], out / "analysis", tsne=cfg.tsne)
    if cfg.cache_activations and not cfg.keep_activations:
        shutil.rmtree(out / "activations", ignore_errors=True)
    seconds = time.perf_counter() - start
    table = format_table(rows)
    atomic_write_json({"config": dataclasses.asdict(cfg), "rows": rows, "seconds": seconds, "stages": stages},
                      out / "results.json")
    write_report(out, cfg, rows, table, seconds)
    print(table)
    log(f"done in {seconds:.0f}s; report: {out / 'report.md'}")
    return DemoResult(out=out, rows=rows, table=table, seconds=seconds)
