"""Tests of the switch-sae command line: options derived from the configs, errors, and the
train -> eval -> analyze path on the embedded model at tiny sizes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from benchmarks import BenchConfig
from switch_sae import cli
from switch_sae.activations import DataConfig
from switch_sae.cli import commands
from switch_sae.dashboard import DashboardConfig
from switch_sae.experiments import DemoConfig, ReproduceConfig
from switch_sae.models import SwitchSAEConfig, TopKSAEConfig
from switch_sae.training import TrainConfig

TINY_DATA = ["--context-size", "32", "--train-tokens", "512", "--batch-size", "128", "--eval-contexts", "2",
             "--harvest-batch", "8", "--no-progress"]


def help_text(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def flags(cls, exclude=()) -> list[str]:
    return ["--" + f.name.replace("_", "-") for f in dataclasses.fields(cls) if f.name not in exclude]


@pytest.mark.parametrize(
    "argv, configs",
    [
        (["demo"], [(DemoConfig, ())]),
        (["reproduce"], [(ReproduceConfig, ())]),
        (["train", "switch"], [(DataConfig, ()), (SwitchSAEConfig, commands.SAE_FILLED), (TrainConfig, commands.TRAIN_FILLED)]),
        (["train", "topk"], [(TopKSAEConfig, commands.SAE_FILLED)]),
        (["eval"], [(DataConfig, commands.EVAL_UNUSED)]),
        (["bench"], [(BenchConfig, ())]),
        (["dashboard"], [(DataConfig, commands.EVAL_UNUSED + ("eval_contexts",)), (DashboardConfig, ())]),
    ],
)
def test_help_documents_every_config_field(argv, configs, capsys):
    text = help_text(argv, capsys)
    for cls, exclude in configs:
        for flag in flags(cls, exclude):
            assert flag in text, f"{flag} missing from `switch-sae {' '.join(argv)} --help`"
    if argv[0] == "train":  # the command fills these in itself (from the data and --out)
        for filled in ("--d-in", "--total-steps", "--run-dir", "--model-name"):
            assert filled + " " not in text
    assert "(default:" in text


def test_help_shows_field_docstrings(capsys):
    text = " ".join(help_text(["train", "switch"], capsys).split())
    assert "Experts per token: 1 is the paper's Switch SAE, >1 multi-expert activation." in text
    assert "Weight of the load-balancing loss" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--k", "0"], "k must be a positive integer"),
        (["demo", "--d-sae", "100", "--n-experts", "8"], "must divide d_sae=100"),
        (["demo", "--resume"], "resume needs out"),
        (["demo", "--dataset", "./no/such/text"], "is neither a file nor a folder"),
        (["demo", "--device", "cuda:7"], "no CUDA GPU"),
        (["demo", "--resume", "--out", "{tmp}/nothing"], "cannot resume"),
        (["eval", "{tmp}/nothing"], "nothing"),
        (["analyze", "{tmp}/nothing"], "does not exist"),
        (["train", "topk", "--d-sae", "64", "--k", "128", "--out", "{tmp}/r"], "k=128 is larger than the dictionary"),
        (["train", "switch", "--n-experts", "4", "--d-expert", "8", "--k", "2", "--train-tokens", "10"], "less than one batch"),
        (["bench", "--k", "0"], "k must be a positive integer"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, tmp_path, capsys, patched_lm):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"switch-sae {argv[0]}: error: ") and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--epochs", "two"], "expected int, got 'two'"),
        (["train", "switch", "--k", "4"], "the following arguments are required: --n-experts, --d-expert"),
        (["train", "mlp"], "invalid choice: 'mlp'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_malformed_options_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == cli.EXIT_USAGE
    assert message in capsys.readouterr().err


def test_train_eval_analyze(tmp_path, capsys, patched_lm):
    run = tmp_path / "run"
    # --cache-activations false: the streaming path the paper preset uses (no disk cache).
    argv = ["train", "switch", "--n-experts", "4", "--d-expert", "32", "--k", "4", "--out", str(run),
            "--cache-activations", "false", "--epochs", "2", *TINY_DATA]
    assert cli.main(argv) == 0
    config = json.loads((run / "sae" / "cfg.json").read_text())
    assert (config["architecture"], config["n_experts"], config["d_in"]) == ("switch", 4, 576)
    assert config["hook_name"] == "blocks.9.hook_resid_post" and config["model_name"] == "default"
    steps = (run / "metrics.jsonl").read_text().splitlines()
    assert len(steps) == 2 * (512 // 128) and not (run / "activations").exists()
    first = json.loads((run / "eval.json").read_text())
    assert first["architecture"] == "switch" and first["l0"] <= 4
    assert "loss_recovered_zero" in capsys.readouterr().out

    # The same folder again without --resume is refused; with --resume it finds the run finished.
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "already exists" in capsys.readouterr().err

    (run / "eval.json").unlink()
    assert cli.main(["eval", str(run), "--context-size", "32", "--eval-contexts", "2", "--no-progress"]) == 0
    assert json.loads((run / "eval.json").read_text())["mse"] == pytest.approx(first["mse"])

    out = tmp_path / "analysis"
    assert cli.main(["analyze", str(run), "--out", str(out), "--no-tsne"]) == 0
    assert (out / "summary.md").is_file() and (out / f"{run.name}_expert_similarity.png").is_file()


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "switch_sae", "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0
    assert all(command in done.stdout for command in ("train", "eval", "analyze", "bench", "demo"))
