"""``switch-sae reproduce``: the paper's comparisons as sweeps, with its figures.

One harvest into the disk activation cache feeds every SAE (the same batches in the same
order), and every SAE is scored on the same held-out tokens by ``evals.evaluate_many``
(the model's clean and ablated passes run once for all of them). The sweeps:

- over ``k`` in ``ks``: a TopK SAE of ``d_sae`` features, its FLOP-matched and its
  width-matched Switch SAE (``n_experts`` experts; ``evals.flops.make_saes``), and ReLU and
  Gated SAEs of ``d_sae`` features at each L1 coefficient (their L0 follows from it);
- over ``n_experts`` in ``expert_counts`` at ``k = expert_k``: FLOP- and width-matched
  Switch SAEs against the TopK SAE. Runs that two sweeps share are trained once.

The run folder (``--out``) holds ``reproduce_config.json``, ``runs/<name>/`` per SAE
(``sae/``, ``checkpoints/``, ``metrics.jsonl``, ``eval.json``), ``results.json``,
``results.md`` and ``figures/``: MSE vs L0, MSE vs training FLOPs, loss recovered vs L0
and duplicate fraction vs n_experts. Running the same command again on the same ``--out``
carries on: finished SAEs are reused, an interrupted one resumes from its checkpoint, an
interrupted harvest resumes.

Default sizes and time on a 2-core CPU (from measured rates: harvest ~2,000 tokens/s, the
full model forward ~550 tokens/s, a 4096-feature TopK SAE trains at ~19k tokens/s, an
8 x 4096 FLOP-matched Switch SAE at ~3k tokens/s; Switch training time grows with its
total parameters, the per-step work): 1.2M training tokens harvested in ~10 min; 20
distinct SAEs of base width 2048 trained on them in ~35 min, the 8- and 16-expert
FLOP-matched ones (16k and 32k features) being most of it; 23 model passes over 8,192
held-out tokens in ~6 min; geometry and figures ~2 min. About 55 minutes in all.

What it leaves out: the pieces (``pipeline``, ``training``, ``evals``) and the demo's
single three-way comparison (``demo``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..activations import hook_d_in
from ..activations.pipeline import DataConfig, activation_source, check_inputs, eval_tokens, load_language_model, training_batches
from ..evals import flops, plots
from ..models import SAE, GatedSAE, GatedSAEConfig, ReLUSAE, ReLUSAEConfig, TopKSAEConfig
from ..training import TrainConfig, Trainer
from ..utils.checks import is_int
from ..utils.io import atomic_write, atomic_write_json
from ..utils.runs import config_clashes, require_empty
from .demo import evaluate_trained, log
from .demo_report import format_table

CONFIG_FILE = "reproduce_config.json"
RESUMABLE = ("progress", "keep_activations", "out")  # may change between a run and its continuation
SERIES = {"topk": "topk", "switch-flop": "switch FLOP-matched", "switch-width": "switch width-matched",
          "relu": "relu", "gated": "gated"}
COLUMNS = (
    ("SAE", "name", "{}"),
    ("k", "k", "{}"),
    ("experts", "n_experts", "{}"),
    ("d_sae", "d_sae", "{}"),
    ("L1", "l1_coefficient", "{:g}"),
    ("FLOPs/tok", "flops_per_token", "{:.3g}"),
    ("train FLOPs", "train_flops", "{:.3g}"),
    ("MSE", "mse", "{:.4g}"),
    ("FVE", "fve", "{:.3f}"),
    ("L0", "l0", "{:.1f}"),
    ("LR zero", "loss_recovered", "{:.3f}"),
    ("unseen", "unseen_fraction", "{:.1%}"),
    ("floor", "unseen_floor", "{:.1%}"),
    ("dead", "dead_fraction", "{:.1%}"),
    ("dup@0.9", "duplicate_fraction", "{:.2%}"),
    ("tok/s", "tokens_per_s", "{:.0f}"),
)


@dataclass
class ReproduceConfig(DataConfig):
    """The paper's sweeps (k; n_experts) of TopK, FLOP- and width-matched Switch, ReLU and Gated SAEs."""

    train_tokens: int | None = 1_200_000
    """Activations harvested (once, into the run folder) for training every SAE."""
    eval_contexts: int | None = 64
    """Held-out contexts every SAE is evaluated on (64 x 128 = 8192 tokens)."""
    batch_size: int | None = 1024
    """Tokens per training step."""
    d_sae: int = 2048
    """Features of the TopK, ReLU and Gated SAEs, and of each expert of a FLOP-matched Switch SAE."""
    ks: tuple[int, ...] = (16, 32, 64)
    """Active features per token of the k sweep."""
    n_experts: int = 8
    """Experts of the Switch SAEs in the k sweep."""
    expert_counts: tuple[int, ...] = (1, 2, 4, 8, 16)
    """Experts of the Switch SAEs in the n_experts sweep (each must divide d_sae)."""
    expert_k: int = 32
    """k of the n_experts sweep."""
    l1_coefficients: tuple[float, ...] = (1.0, 4.0)
    """L1 coefficients of the ReLU and Gated SAEs (one SAE of each per value; a larger one gives a lower L0)."""
    keep_activations: bool = False
    """Keep the activation cache in the run folder after a successful run."""
    out: str = ""
    """Run folder; empty means runs/reproduce-<date>-<time>. An existing one made by the same options is continued."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.ks, self.expert_counts = tuple(self.ks), tuple(self.expert_counts)  # JSON round trips give lists
        self.l1_coefficients = tuple(self.l1_coefficients)
        for name, values in (("ks", self.ks), ("expert_counts", self.expert_counts),
                             ("d_sae", (self.d_sae,)), ("n_experts", (self.n_experts,)), ("expert_k", (self.expert_k,))):
            if not values or any(not is_int(v) or v < 1 for v in values):
                raise ValueError(f"{name} must be positive integers, got {values!r}")
        if not self.l1_coefficients or any(not 0 < c < float("inf") for c in self.l1_coefficients):
            raise ValueError(f"l1_coefficients must be finite positive numbers, got {self.l1_coefficients!r}")
        if not self.cache_activations:
            raise ValueError("reproduce harvests once into the activation cache; cache_activations must stay on")
        for n in (self.n_experts, *self.expert_counts):
            if self.d_sae % n:
                raise ValueError(f"n_experts={n} must divide d_sae={self.d_sae} (the width-matched Switch SAE splits it)")
        for k, n in [(k, self.n_experts) for k in self.ks] + [(self.expert_k, n) for n in self.expert_counts]:
            if k > self.d_sae // n:
                raise ValueError(f"k={k} exceeds the width-matched experts' d_expert={self.d_sae // n} "
                                 f"({n} experts); lower k or raise d_sae")

    def resolved(self) -> ReproduceConfig:
        """A copy with device, hook and run folder filled in."""
        cfg = dataclasses.replace(self, device=self.resolved_device(), hook_name=self.resolved_hook(),
                                  out=self.out or f"runs/reproduce-{time.strftime('%Y%m%d-%H%M%S')}")
        cfg.steps()  # checks that there is at least one batch
        return cfg


@dataclass
class Run:
    """One SAE of the sweeps, before training."""

    name: str
    series: str
    """Its line in the figures (a key of SERIES)."""
    sweep: str
    """'k', 'n_experts' or 'l1'."""
    sae: SAE | None
    """The initialised SAE; dropped (None) once trained, to free its memory."""
    l1_coefficient: float | None = None


@dataclass
class ReproduceResult:
    """What ``run_reproduce`` produced."""

    out: Path
    """The run folder."""
    rows: list[dict[str, Any]]
    """One row per named SAE of the sweeps (shared runs appear under each name)."""
    table: str
    """The rows as a Markdown table (as in results.md)."""
    figures: list[Path]
    """The paper's four figures."""
    seconds: float
    """Wall time of this invocation."""


# ------------------------------------------------------------------ the sweeps


def planned_runs(cfg: ReproduceConfig, d_in: int) -> list[Run]:
    """Every SAE of both sweeps, freshly initialised (duplicates are merged by ``run_reproduce``)."""
    meta = {"hook_name": cfg.hook_name, "model_name": cfg.model, "device": cfg.device}
    runs = []
    for k in cfg.ks:
        trio = flops.make_saes(TopKSAEConfig(d_in=d_in, d_sae=cfg.d_sae, k=k, **meta), cfg.n_experts, seed=cfg.seed)
        runs += [Run(f"{series}-k{k}", series, "k", sae) for series, sae in trio.items()]
    for n in cfg.expert_counts:
        trio = flops.make_saes(TopKSAEConfig(d_in=d_in, d_sae=cfg.d_sae, k=cfg.expert_k, **meta), n, seed=cfg.seed)
        runs += [Run(f"{series}-n{n}", series, "n_experts", sae) for series, sae in trio.items() if series != "topk"]
    for l1 in cfg.l1_coefficients:
        for i, (series, cls, config_class) in enumerate((("relu", ReLUSAE, ReLUSAEConfig), ("gated", GatedSAE, GatedSAEConfig))):
            torch.manual_seed(cfg.seed + i)
            sae = cls(config_class(d_in=d_in, d_sae=cfg.d_sae, l1_coefficient=l1, **meta))
            runs.append(Run(f"{series}-l1-{l1:g}", series, "l1", sae, l1))
    return runs


def _identity(run: Run) -> str:
    """Runs with the same identity are the same training run (e.g. the sweeps' shared points)."""
    return json.dumps([run.sae.config_dict(), run.l1_coefficient], sort_keys=True)


def train_run(cfg: ReproduceConfig, run: Run, source: Callable[[], Any], run_dir: Path) -> SAE:
    """Train ``run`` in ``run_dir`` (resuming a checkpoint there), or reuse a finished SAE;
    ``source()`` gives the training activations."""
    if (run_dir / "sae" / "model.safetensors").is_file():
        log(f"{run.name}: already trained, reusing {run_dir / 'sae'}")
    else:
        train_cfg = TrainConfig(total_steps=cfg.steps(), seed=cfg.seed, run_dir=str(run_dir), resume=True,
                                progress=cfg.progress)
        Trainer(run.sae, train_cfg).fit(training_batches(cfg, source()))
    return SAE.load(run_dir / "sae", device=cfg.device)


def prepare_run_dir(cfg: ReproduceConfig) -> ReproduceConfig:
    """Create ``cfg.out`` with the config, or check that an existing one was made by the same options."""
    out, saved_path = Path(cfg.out), Path(cfg.out) / CONFIG_FILE
    if saved_path.is_file():
        saved = ReproduceConfig(**json.loads(saved_path.read_text()))
        if clashes := config_clashes(saved, cfg, ignore=RESUMABLE):
            raise ValueError(f"cannot continue {out}: these options differ from its run (was, now): {clashes}")
        return cfg
    require_empty(out, f"it holds no {CONFIG_FILE}, so it is not a reproduce run; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(dataclasses.asdict(cfg), saved_path)
    return cfg


# ------------------------------------------------------------------ figures and table


def draw_figures(rows: list[dict[str, Any]], cfg: ReproduceConfig, folder: Path) -> list[Path]:
    """The paper's four figures from the result rows (each a small PNG)."""
    def points(keep: Any) -> list[dict[str, Any]]:
        """Rows chosen by ``keep``, one per trained SAE and line (the sweeps share some SAEs)."""
        unique = {(r["series"], r["trained_as"]): {**r, "label": r["series"]} for r in rows if keep(r)}
        return list(unique.values())

    k_sweep = points(lambda r: r["sweep"] in ("k", "l1"))
    at_expert_k = points(lambda r: r["k"] == cfg.expert_k and r["sweep"] != "l1")
    experts = points(lambda r: r["sweep"] == "n_experts" or (r["series"] == "topk" and r["k"] == cfg.expert_k))
    return [
        plots.plot_mse_vs_l0(k_sweep, folder / "mse_vs_l0.png"),
        plots.plot_loss_recovered_vs_l0(k_sweep, folder / "loss_recovered_vs_l0.png"),
        plots.plot_mse_vs_flops(at_expert_k, folder / "mse_vs_flops.png"),
        plots.plot_duplicate_fraction(experts, folder / "duplicate_fraction_vs_experts.png"),
    ]


def write_results(out: Path, cfg: ReproduceConfig, rows: list[dict[str, Any]], table: str, figures: list[Path], seconds: float) -> None:
    """``results.json`` (every number) and ``results.md`` (the table, the setup, the figures)."""
    atomic_write_json({"config": dataclasses.asdict(cfg), "rows": rows, "seconds": seconds}, out / "results.json")
    text = "\n".join([
        "# switch_sae reproduce: the paper's sweeps",
        "",
        f"Model `{cfg.model}`, hook `{cfg.hook_name}`, text `{cfg.dataset}`. Every SAE trained on the same "
        f"{cfg.steps()} batches of {cfg.batch_size} activations ({cfg.train_tokens} tokens, {cfg.epochs} pass(es)) "
        f"with the default recipe, and evaluated on the same {cfg.eval_contexts} held-out contexts of "
        f"{cfg.context_size} tokens. Base width {cfg.d_sae}; k sweep {list(cfg.ks)} with {cfg.n_experts} experts; "
        f"expert sweep {list(cfg.expert_counts)} at k={cfg.expert_k}; L1 coefficients {list(cfg.l1_coefficients)}.",
        "",
        table,
        "",
        "FLOP-matched: each expert as wide as the TopK SAE; width-matched: the TopK SAE's features split over the "
        "experts. unseen / floor / dead: as in the demo's legend (dead needs 10 d_sae / L0 tokens, from the eval or "
        "the training tracker).",
        "",
        f"Wall time {seconds:.0f} s.",
        "",
        *[f"![{p.stem}](figures/{p.name})" for p in figures],
        "",
    ])
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(text))


# ------------------------------------------------------------------ the whole job


def prepare_reproduce(cfg: ReproduceConfig) -> ReproduceConfig:
    """Resolve the config, check the inputs exist and make (or reopen) the run folder.

    Everything a user can get wrong fails here, before any work, with ValueError or
    FileNotFoundError/FileExistsError naming the problem.
    """
    cfg = cfg.resolved()
    check_inputs(cfg)
    return prepare_run_dir(cfg)


def run_reproduce(cfg: ReproduceConfig) -> ReproduceResult:
    """Run both sweeps (see the module docstring); prints the table and returns the results."""
    return execute_reproduce(prepare_reproduce(cfg))


def execute_reproduce(cfg: ReproduceConfig) -> ReproduceResult:
    """The work of ``run_reproduce`` on a config returned by ``prepare_reproduce``."""
    start = time.perf_counter()
    out = Path(cfg.out)
    lm = load_language_model(cfg)
    tokens = eval_tokens(cfg, lm)
    d_in = hook_d_in(lm, cfg.hook_name)

    @functools.cache
    def source() -> Any:  # harvested on first need: a continued run may have nothing left to train
        log(f"harvesting {cfg.train_tokens} training tokens at {cfg.hook_name} (d_in={d_in}) into {out / 'activations'}")
        return activation_source(cfg, lm, d_in, out / "activations")

    planned = planned_runs(cfg, d_in)
    identities = [_identity(run) for run in planned]
    trained_as = {}  # identity -> the name of the run that trained it (its first name)
    for identity, run in zip(identities, planned):
        trained_as.setdefault(identity, run.name)
    trained: dict[str, SAE] = {}
    for identity, run in zip(identities, planned):
        if trained_as[identity] == run.name:
            log(f"training {len(trained) + 1}/{len(trained_as)} {run.name}: d_sae={run.sae.d_sae}, {cfg.steps()} steps")
            trained[run.name] = train_run(cfg, run, source, out / "runs" / run.name)
        run.sae = None

    log(f"evaluating {len(trained)} SAEs on {tokens.numel()} held-out tokens")
    evaluated = {r["name"]: r for r in evaluate_trained(cfg, lm, tokens, trained, {n: out / "runs" / n for n in trained})}
    tokens_trained = cfg.steps() * cfg.batch_size
    rows = []
    for identity, run in zip(identities, planned):
        first = trained_as[identity]
        rows.append({**evaluated[first], "name": run.name, "trained_as": first, "series": SERIES[run.series],
                     "sweep": run.sweep, "l1_coefficient": run.l1_coefficient,
                     "train_flops": flops.training_flops(trained[first], tokens_trained, cfg.batch_size)})
    figures = draw_figures(rows, cfg, out / "figures")
    if not cfg.keep_activations:
        shutil.rmtree(out / "activations", ignore_errors=True)
    seconds = time.perf_counter() - start
    table = format_table(rows, markdown=True, columns=COLUMNS)
    write_results(out, cfg, rows, table, figures, seconds)
    print(format_table(rows, columns=COLUMNS))
    log(f"done in {seconds:.0f}s; results: {out / 'results.md'}")
    return ReproduceResult(out=out, rows=rows, table=table, figures=figures, seconds=seconds)
