"""The ``switch-sae`` command (also ``python -m switch_sae``): train | eval | analyze | dashboard | bench | demo | reproduce | selftest.

Options are derived from the config dataclasses (``cli.args``), so ``switch-sae <command>
--help`` documents every field with its docstring and default:

- ``demo``: the main job (``demo.DemoConfig``): TopK vs FLOP- and width-matched Switch SAEs.
- ``reproduce``: the paper's sweeps over k and n_experts with its figures
  (``experiments.reproduce.ReproduceConfig``), about an hour on a 2-core CPU.
- ``train ARCH``: one SAE of architecture ARCH (``DataConfig`` + the architecture's config
  + ``TrainConfig``) into a run folder (``sae/``, ``checkpoints/``, ``metrics.jsonl``,
  ``eval.json``).
- ``eval SAE_DIR...``: evaluate saved SAEs on held-out tokens, print and save the metrics.
- ``analyze RUN_DIR...``: geometry, FLOPs and plots of saved runs (``evals.report``).
- ``dashboard RUN_OR_SAE``: a static site with a page per feature (``dashboard``).
- ``bench``: time the ops and training steps against the alternatives (the ``benchmarks``
  package of a source checkout).
- ``selftest``: check the compiled ops on this device against ``reference.py`` (``selftest``);
  exits 1 on a mismatch.

A bad option or a missing input exits with code 2 and a one-line message (no traceback);
Ctrl-C exits with 130 after the trainer has written a checkpoint, and says how to resume.

What it leaves out: the work itself, which lives in the modules each command calls.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..activations.pipeline import DataConfig
from ..experiments.demo import DemoConfig
from ..models import architectures
from ..training import TrainConfig
from ..utils.runs import require_empty
from .args import add_dataclass_arguments, dataclass_from_args

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# Fields a command fills in itself (from the data or its own options), so they are not options.
SAE_FILLED = ("d_in", "device", "hook_name", "model_name")
TRAIN_FILLED = ("total_steps", "run_dir", "progress", "seed")
EVAL_UNUSED = ("train_tokens", "epochs", "batch_size", "cache_activations")


class UsageError(Exception):
    """The arguments or the inputs of a command are wrong; reported without a traceback."""


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Turn the errors that validating configs and inputs raises into ``UsageError``."""
    from ..training import CheckpointError

    try:
        yield
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, CheckpointError) as err:
        raise UsageError(str(err)) from err


# ------------------------------------------------------------------ demo and reproduce


def add_workflow(commands: Any, name: str, config_class: type, handler: Any, **texts: str) -> None:
    """A command whose options are ``config_class``'s fields; ``texts``: argparse's help and description."""
    parser = commands.add_parser(name, **texts)
    add_dataclass_arguments(parser, config_class, title=f"{name} options")
    parser.set_defaults(handler=handler)


def run_workflow(args: argparse.Namespace, config_class: type, prepare: Any, execute: Any, resume_hint: str) -> int:
    """``prepare`` the config from ``args`` (its errors are usage errors), then ``execute`` it;
    ``resume_hint`` (formatted with ``out``) is printed if Ctrl-C interrupts the work."""
    with usage_errors():
        cfg = prepare(dataclass_from_args(config_class, args))
    args.resume_hint = resume_hint.format(out=cfg.out)
    execute(cfg)
    return 0


def add_demo(commands: Any) -> None:
    add_workflow(
        commands, "demo", DemoConfig, run_demo_command,
        help="the main job: TopK vs FLOP- and width-matched Switch SAEs, table + report",
        description="Harvest activations from a model (default: the embedded SmolLM2-135M, no internet "
        "needed), train a TopK SAE and FLOP-matched and width-matched Switch SAEs on the same batches, "
        "evaluate them on the same held-out tokens, print a comparison table and write a report with plots. "
        "Sizes left unset come from --preset.",
    )


def run_demo_command(args: argparse.Namespace) -> int:
    from ..experiments.demo import execute_demo, prepare_demo

    return run_workflow(args, DemoConfig, prepare_demo, execute_demo, "switch-sae demo --resume --out {out}")


def add_reproduce(commands: Any) -> None:
    from ..experiments.reproduce import ReproduceConfig

    add_workflow(
        commands, "reproduce", ReproduceConfig, run_reproduce_command,
        help="the paper's sweeps over k and n_experts: table + figures (~1 h on a 2-core CPU)",
        description="Harvest activations once, train TopK, FLOP- and width-matched Switch, ReLU and Gated SAEs over "
        "k, and Switch SAEs over n_experts, evaluate all on the same held-out tokens, and write a table "
        "(results.md, results.json) and the paper's figures (figures/*.png). Running it again with the same "
        "--out continues an interrupted run.",
    )


def run_reproduce_command(args: argparse.Namespace) -> int:
    from ..experiments.reproduce import ReproduceConfig, execute_reproduce, prepare_reproduce

    return run_workflow(args, ReproduceConfig, prepare_reproduce, execute_reproduce, "the same command with --out {out}")


# ------------------------------------------------------------------ train


def add_train(commands: Any) -> None:
    parser = commands.add_parser(
        "train", help="train one SAE on activations harvested from a model, or stored ones",
        description="Train one SAE. Pick the architecture, then see `switch-sae train ARCH --help`.",
    )
    arch_parsers = parser.add_subparsers(dest="architecture", required=True, metavar="ARCH")
    for name, cls in sorted(architectures().items()):
        sub = arch_parsers.add_parser(name, help=(cls.__doc__ or "").strip().splitlines()[0],
                                       description=f"Train a {name} SAE. {cls.__doc__ or ''}".strip())
        sub.add_argument("--out", default="", help="run folder (default: runs/train-<architecture>-<date>-<time>)")
        sub.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True,
                         help="evaluate the trained SAE on the held-out contexts (default: yes)")
        sub.add_argument("--activations", default="", metavar="PATH",
                         help="train on stored activations instead of harvesting (no language model is loaded): an "
                         "activation-cache folder, a folder of .npy/.safetensors shards, or a saved datasets dataset "
                         "(SAELens cached activations); every stored row is used")
        sub.add_argument("--activations-column", default="", metavar="NAME",
                         help="the activation column (datasets) or tensor (.safetensors) when there are several")
        add_dataclass_arguments(sub, DataConfig, title="data options")
        add_dataclass_arguments(sub, cls.config_class, exclude=SAE_FILLED, title=f"{name} SAE options")
        add_dataclass_arguments(sub, TrainConfig, exclude=TRAIN_FILLED, title="training options")
        sub.set_defaults(handler=run_train_command)


def run_train_command(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    from ..activations import hook_d_in, open_activations
    from ..models import SAE
    from ..activations.pipeline import (
        activation_source,
        check_inputs,
        load_language_model,
        process_share,
        training_batches,
    )
    from ..parallel.group import local_device, rank_zero_first
    from ..training import Trainer

    cls = architectures()[args.architecture]
    with usage_errors():
        data = dataclass_from_args(DataConfig, args)
        stored = open_activations(args.activations, column=args.activations_column or None) if args.activations else None
        if stored is None:
            check_inputs(data)
        else:  # train on every stored row
            data = dataclasses.replace(data, train_tokens=len(stored))
        out = Path(args.out or f"runs/train-{args.architecture}-{time.strftime('%Y%m%d-%H%M%S')}")
        train_cfg = dataclass_from_args(TrainConfig, args, total_steps=data.steps(), run_dir=str(out),
                                        progress=data.progress, seed=data.seed)
        if not train_cfg.resume:
            require_empty(out, "pass --resume or another --out")
        rank, world = start_processes(train_cfg, data)
        if world > 1:  # this process's share of the data; only rank 0 shows progress
            shares = [process_share(data, r, world).train_tokens for r in range(world)]
            data = dataclasses.replace(process_share(data, rank, world), progress=data.progress and rank == 0,
                                       device=local_device(data.resolved_device()))
            train_cfg = dataclasses.replace(train_cfg, progress=data.progress)
            if stored is not None:  # consecutive blocks of the stored rows, one per process
                stored = stored.rows(sum(shares[:rank]), sum(shares[: rank + 1]))
    args.resume_hint = f"the same command with --resume --out {out}"
    if stored is None:
        with rank_zero_first():  # the first load may convert the default model into a shared cache
            lm = load_language_model(data)
        hook, model_name = data.resolved_hook(), data.model
    else:  # no language model: the activations are already there
        lm, hook, model_name = None, data.hook_name or stored.hook_name, stored.model_name or data.model
    with usage_errors():
        d_in = hook_d_in(lm, hook) if lm is not None else stored.d_in
        sae = cls(dataclass_from_args(cls.config_class, args, d_in=d_in, device=data.resolved_device(),
                                      hook_name=hook, model_name=model_name))
        trainer = Trainer(sae, train_cfg)
    cache = out / "activations" / (f"rank_{rank:05d}-of-{world:05d}" if world > 1 else "")
    source = activation_source(data, lm, d_in, cache, shard=(rank, world)) if stored is None else stored
    trainer.fit(training_batches(data, source))
    if rank > 0:  # rank 0 reports and evaluates
        return 0
    print(f"saved {out / 'sae'}")
    if args.eval and lm is None:
        print(f"not evaluated: trained from stored activations without a language model; run `switch-sae eval {out} --model ...`")
    elif args.eval:
        evaluate_and_save(SAE.load(out / "sae", device=data.resolved_device()), lm, data, out)
    return 0


def start_processes(train_cfg: TrainConfig, data: DataConfig) -> tuple[int, int]:
    """``(rank, world)``: join the process group torchrun set up when training in parallel."""
    if train_cfg.parallel == "none":
        return 0, 1
    import torch
    import torch.distributed as dist

    from ..parallel.group import join, local_device

    group = join(torch.device(local_device(data.resolved_device())), train_cfg.parallel_timeout_s)
    dist.barrier(group)  # every process checked the run folder before any writes to it
    return dist.get_rank(group), dist.get_world_size(group)


# ------------------------------------------------------------------ eval


def add_eval(commands: Any) -> None:
    parser = commands.add_parser(
        "eval", help="evaluate saved SAEs on held-out tokens (MSE, FVE, L0, loss recovered, KL, ...)",
        description="Evaluate saved SAEs (folders with cfg.json + model.safetensors, or run folders holding "
        "one) on the same held-out tokens; writes eval.json next to each SAE.",
    )
    parser.add_argument("sae_dirs", nargs="+", metavar="SAE_DIR", help="saved SAE or run folder")
    add_dataclass_arguments(parser, DataConfig, exclude=EVAL_UNUSED, title="data options")
    parser.set_defaults(handler=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> int:
    from ..evals.report import find_sae_dir
    from ..models import SAE
    from ..activations.pipeline import check_inputs, load_language_model

    with usage_errors():
        data = dataclass_from_args(DataConfig, args)
        check_inputs(data)
        folders = [find_sae_dir(Path(d)) for d in args.sae_dirs]
        saes = [SAE.load(folder, device=data.resolved_device()) for folder in folders]
    lm = load_language_model(data)
    for folder, sae in zip(folders, saes):
        print(f"== {folder}")
        evaluate_and_save(sae, lm, data, folder.parent if folder.name == "sae" else folder)
    return 0


def evaluate_and_save(sae: Any, lm: Any, data: DataConfig, folder: Path) -> None:
    """Evaluate ``sae`` on ``data``'s held-out tokens at its hook; print and save ``eval.json``."""
    from ..evals.evaluate import evaluate
    from ..activations.pipeline import eval_tokens

    hook = data.hook_name or sae.cfg.hook_name or data.resolved_hook()
    result = evaluate(sae, lm, eval_tokens(data, lm), hook, batch_size=data.harvest_batch, progress=data.progress)
    result.save(folder / "eval.json")
    print(result.table())
    print(f"saved {folder / 'eval.json'}")


# ------------------------------------------------------------------ analyze and bench


def add_analyze(commands: Any) -> None:
    parser = commands.add_parser(
        "analyze", help="feature geometry, FLOPs and plots of saved runs",
        description="Analyse saved runs: duplicates, nearest-neighbour cosines, expert similarity, FLOPs, "
        "and plots across runs; writes report.json, summary.md and PNGs.",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folder holding one saved SAE (and its metrics)")
    parser.add_argument("--out", default="analysis", help="output folder (default: analysis)")
    parser.add_argument("--tsne", action=argparse.BooleanOptionalAction, default=True, help="draw t-SNE plots (default: yes)")
    parser.set_defaults(handler=run_analyze_command)


def run_analyze_command(args: argparse.Namespace) -> int:
    from ..evals.report import analyze_runs, find_sae_dir

    with usage_errors():
        for run_dir in args.run_dirs:
            if not Path(run_dir).is_dir():
                raise FileNotFoundError(f"run directory {run_dir} does not exist")
            find_sae_dir(Path(run_dir))
    out = analyze_runs(args.run_dirs, args.out, tsne=args.tsne)
    print((out / "summary.md").read_text())
    print(f"wrote {out}")
    return 0


def add_dashboard(commands: Any) -> None:
    from ..dashboard import DashboardConfig

    parser = commands.add_parser(
        "dashboard", help="a static site showing every feature: top contexts, histograms, logit effects, experts",
        description="Read held-out tokens through the model and a saved SAE in one pass and write a static "
        "site (no server needed: open index.html) with a sortable, searchable table of every feature, a page "
        "per feature (top-activating and quantile-sampled contexts, activation histogram, logit effects, "
        "nearest features) and, for Switch SAEs, expert pages.",
    )
    parser.add_argument("sae_dir", metavar="RUN_OR_SAE", help="saved SAE folder, or a run folder holding one")
    parser.add_argument("--out", default="", help="output folder (default: dashboard/ inside RUN_OR_SAE)")
    add_dataclass_arguments(parser, DataConfig, exclude=EVAL_UNUSED + ("eval_contexts",), title="data options")
    add_dataclass_arguments(parser, DashboardConfig, title="dashboard options")
    parser.set_defaults(handler=run_dashboard_command)


def run_dashboard_command(args: argparse.Namespace) -> int:
    import dataclasses

    from ..dashboard import DashboardConfig, build_dashboard
    from ..evals.report import find_sae_dir
    from ..models import SAE
    from ..activations.pipeline import check_inputs, eval_tokens, load_language_model

    with usage_errors():
        if not Path(args.sae_dir).is_dir():
            raise FileNotFoundError(f"{args.sae_dir} is not a folder")
        cfg = dataclass_from_args(DashboardConfig, args)
        data = dataclass_from_args(DataConfig, args)
        data = dataclasses.replace(data, eval_contexts=-(-cfg.tokens // (data.context_size - 1)))
        check_inputs(data)
        folder = find_sae_dir(Path(args.sae_dir))
        sae = SAE.load(folder, device=data.resolved_device())
        out = Path(args.out or Path(args.sae_dir) / "dashboard")
    lm = load_language_model(data)
    hook = data.hook_name or sae.cfg.hook_name or data.resolved_hook()
    with usage_errors():
        tokens = eval_tokens(data, lm)
    index = build_dashboard(sae, lm, tokens, hook, out, cfg, title=f"{folder.name} · {sae.architecture} SAE",
                            model_name=data.model, harvest_batch=data.harvest_batch, seed=data.seed,
                            progress=data.progress)
    print(f"wrote {index}")
    return 0


def add_bench(commands: Any) -> None:
    # Its options, --help included, belong to the benchmarks package: they pass through.
    parser = commands.add_parser(
        "bench", add_help=False,
        help="time the ops and training steps against the alternatives (benchmarks/, in a source checkout)",
    )
    parser.set_defaults(handler=run_bench_command)


def benchmarks_package() -> Any:
    """The ``benchmarks`` package of a source checkout (beside ``python/``, or in the working
    folder): benchmarks live with the sources, not in the installed package."""
    for root in (Path(__file__).resolve().parents[3], Path.cwd()):
        if (root / "benchmarks" / "runner.py").is_file():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            return importlib.import_module("benchmarks")
    raise UsageError("the benchmarks live in the source tree's benchmarks/ folder; run this in a switch_sae checkout")


def run_bench_command(args: argparse.Namespace) -> int:
    bench = benchmarks_package()
    with usage_errors():
        cfg = bench.parse_config(args.passed_through, prog="switch-sae bench")
    bench.run_benchmarks(cfg)
    return 0


# ------------------------------------------------------------------ selftest


def add_selftest(commands: Any) -> None:
    parser = commands.add_parser(
        "selftest", help="check every compiled op on this device against reference.py",
        description="Run every compiled op on sample shapes against its PyTorch twin: forward, gradients, "
        "determinism. Run it first on a new GPU. Exits 1 on any mismatch.",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if present, else cpu)")
    parser.set_defaults(handler=run_selftest_command)


def run_selftest_command(args: argparse.Namespace) -> int:
    from ..self_test import selftest

    with usage_errors():
        report = selftest(args.device)
    return 0 if report.ok else 1


# ------------------------------------------------------------------ entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switch-sae",
        description="Switch sparse autoencoders: train, evaluate, analyse, browse features, benchmark, self-test, run the demo or reproduce the paper.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_demo, add_reproduce, add_train, add_eval, add_analyze, add_dashboard, add_bench, add_selftest):
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``switch-sae`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command != "bench" and unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.passed_through = unknown
    try:
        return args.handler(args)
    except UsageError as err:
        print(f"switch-sae {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        hint = getattr(args, "resume_hint", None)
        print("\ninterrupted" + (f"; checkpoints are kept, resume with: {hint}" if hint else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
