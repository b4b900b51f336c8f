"""Tests of switch_sae.experiments.demo: the main job end to end at tiny sizes, its config, and resuming."""

from __future__ import annotations

import json
import math

import pytest

from switch_sae import cli
from switch_sae.experiments import demo
from switch_sae.experiments.demo import DemoConfig, PRESETS, run_demo

TINY = dict(context_size=32, train_tokens=768, epochs=2, eval_contexts=2, batch_size=128, harvest_batch=8,
            d_sae=128, n_experts=4, k=4, progress=False)
TINY_ARGV = ["--context-size", "32", "--train-tokens", "768", "--epochs", "2", "--eval-contexts", "2",
             "--batch-size", "128", "--harvest-batch", "8", "--d-sae", "128", "--n-experts", "4", "--k", "4",
             "--no-progress"]


def test_unset_sizes_come_from_the_preset():
    cfg = DemoConfig(preset="cpu", k=16, out="x").resolved()
    assert cfg.k == 16 and cfg.d_sae == PRESETS["cpu"]["d_sae"] and cfg.epochs == PRESETS["cpu"]["epochs"]
    assert cfg.hook_name == "blocks.9.hook_resid_post" and cfg.device == "cpu" and cfg.cache_activations
    paper = DemoConfig(model="gpt2", preset="paper", device="cpu").resolved()
    assert (paper.d_sae, paper.batch_size, paper.hook_name) == (24576, 8192, "blocks.8.hook_resid_post")
    assert not paper.cache_activations and paper.out.startswith("runs/demo-")
    # auto: a named model without a GPU still gets the CPU-sized preset.
    assert DemoConfig(model="gpt2", device="cpu").resolved().d_sae == PRESETS["cpu"]["d_sae"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k=0), "k must be a positive integer"),
        (dict(context_size=1), "context_size must be at least 2"),
        (dict(resume=True), "resume needs out"),
    ],
)
def test_bad_fields_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DemoConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_sae=100, n_experts=8), "must divide d_sae=100"),
        (dict(d_sae=64, n_experts=8, k=16), "exceeds the width-matched experts' d_expert=8"),
        (dict(train_tokens=100, batch_size=128), "less than one batch"),
    ],
)
def test_inconsistent_sizes_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DemoConfig(**kwargs).resolved()


def test_the_demo_end_to_end(tmp_path, patched_lm, capsys):
    result = run_demo(DemoConfig(out=str(tmp_path / "run"), **TINY))
    out = result.out
    rows = {r["name"]: r for r in result.rows}
    assert list(rows) == ["topk", "switch-flop", "switch-width"]
    assert [rows[n]["d_sae"] for n in rows] == [128, 4 * 128, 128]
    assert [rows[n]["n_experts"] for n in rows] == [1, 4, 4]
    # FLOP-matched: the same encoder work plus a small router; width-matched: far less.
    assert rows["switch-flop"]["flops_per_token"] < 1.1 * rows["topk"]["flops_per_token"]
    assert rows["switch-width"]["flops_per_token"] < 0.5 * rows["topk"]["flops_per_token"]
    for row in rows.values():
        assert math.isfinite(row["mse"]) and row["mse"] > 0 and row["fve"] <= 1
        assert 0 < row["l0"] <= 4
        assert math.isfinite(row["loss_recovered"]) and math.isfinite(row["kl"]) and row["kl"] >= 0
        assert 0 <= row["duplicate_fraction"] <= 1 and row["tokens_per_s"] > 0
    for name in ("switch-flop", "switch-width"):
        assert sum([rows[name]["expert_load_max"], rows[name]["expert_load_min"]]) <= 1 + 1e-6
    # Every SAE trained on the same number of batches and was scored on the same tokens.
    steps = {n: len((out / n / "metrics.jsonl").read_text().splitlines()) for n in rows}
    assert set(steps.values()) == {2 * (768 // 128)}
    evals = {n: json.loads((out / n / "eval.json").read_text()) for n in rows}
    assert len({e["n_tokens"] for e in evals.values()}) == 1 and len({e["ce_clean"] for e in evals.values()}) == 1
    assert (out / "topk" / "sae" / "model.safetensors").is_file()
    assert not (out / "activations").exists()  # the cache is removed unless --keep-activations
    report = (out / "report.md").read_text()
    assert all(f"| {n} |" in report for n in rows) and "analysis/mse_vs_l0.png" in report
    assert all((out / f).is_file() for f in ("comparison.png", "training_curves.png", "analysis/mse_vs_l0.png"))
    saved = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in saved["rows"]] == list(rows)
    printed = capsys.readouterr().out
    assert result.table in printed and "switch-width" in printed


def test_ctrl_c_leaves_a_resumable_run(tmp_path, patched_lm, monkeypatch, capsys):
    out = tmp_path / "run"
    real_batches = demo.training_batches
    calls = []

    def interrupted_batches(cfg, source):
        calls.append(1)
        for i, batch in enumerate(real_batches(cfg, source)):
            if len(calls) == 2 and i == 3:  # Ctrl-C while training the second SAE
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(demo, "training_batches", interrupted_batches)
    assert cli.main(["demo", "--out", str(out), *TINY_ARGV]) == cli.EXIT_INTERRUPTED
    assert f"resume with: switch-sae demo --resume --out {out}" in capsys.readouterr().err
    assert (out / "topk" / "sae" / "cfg.json").is_file()  # the first SAE was finished
    assert list((out / "switch-flop" / "checkpoints").iterdir())  # the second left a checkpoint
    assert (out / "activations" / "manifest.json").is_file()  # the harvest is kept for the resume

    monkeypatch.setattr(demo, "training_batches", real_batches)
    assert cli.main(["demo", "--resume", "--out", str(out), "--no-progress"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "switch-flop" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 2 * (768 // 128) + 1))  # no step lost or repeated
    assert json.loads((out / "results.json").read_text())["rows"][1]["name"] == "switch-flop"


def test_resume_refuses_changed_sizes(tmp_path):
    cfg = DemoConfig(out=str(tmp_path / "run"), **TINY).resolved()
    demo.prepare_run_dir(cfg)
    with pytest.raises(ValueError, match="differ from the interrupted run.*'k': \\(4, 8\\)"):
        demo.resumed_config(DemoConfig(out=cfg.out, resume=True, k=8))
    resumed = demo.resumed_config(DemoConfig(out=cfg.out, resume=True, progress=True))
    assert resumed.k == 4 and resumed.progress and resumed.resume
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        demo.prepare_run_dir(cfg)
