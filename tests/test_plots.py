"""PNG plots and the analyze report."""

import json

import matplotlib.image
import numpy as np
import pytest
import torch

from switch_sae.evals import plots
from switch_sae.evals.report import analyze_runs, find_sae_dir, read_metrics
from switch_sae.models import SwitchSAE, SwitchSAEConfig, TopKSAE, TopKSAEConfig


def assert_png(path):
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0  # something was drawn


def test_pareto_frontier_known_answer():
    xs = [1, 2, 3, 4, 2.5, 5]
    ys = [9, 5, 6, 2, 4, 2]
    assert plots.pareto_frontier(xs, ys) == [0, 1, 4, 3]
    with pytest.raises(ValueError, match="same length"):
        plots.pareto_frontier([1], [])


def test_every_plot_writes_a_png(tmp_path):
    runs = [
        {"label": "topk", "l0": 8, "mse": 3.0, "loss_recovered": 0.90, "train_flops": 1e12, "n_experts": 1, "duplicate_fraction": 0.0},
        {"label": "topk", "l0": 16, "mse": 2.0, "loss_recovered": 0.95, "train_flops": 2e12, "n_experts": 1, "duplicate_fraction": 0.0},
        {"label": "switch", "l0": 8, "mse": 2.5, "loss_recovered": 0.92, "train_flops": 3e11, "n_experts": 8, "duplicate_fraction": 0.05},
        {"label": "switch", "l0": 16, "mse": 1.9, "loss_recovered": 0.96, "train_flops": 6e11, "n_experts": 16, "duplicate_fraction": 0.08},
    ]
    paths = [
        plots.plot_mse_vs_l0(runs, tmp_path / "pareto.png"),
        plots.plot_loss_recovered_vs_l0(runs, tmp_path / "lr.png"),
        plots.plot_mse_vs_flops(runs, tmp_path / "flops.png"),
        plots.plot_duplicate_fraction(runs, tmp_path / "dup.png"),
        plots.plot_expert_load([0.3, 0.2, 0.25, 0.25], tmp_path / "load.png"),
        plots.plot_expert_similarity(np.eye(4) * 0.5 + 0.2, tmp_path / "sim.png"),
        plots.plot_tsne(np.random.randn(50, 2), np.arange(50) // 10, tmp_path / "sub" / "tsne.png"),
    ]
    for path in paths:
        assert_png(path)


def test_plot_errors(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plots.plot_mse_vs_l0([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="lacks"):
        plots.plot_mse_vs_l0([{"label": "a", "l0": 1}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="square"):
        plots.plot_expert_similarity(np.zeros((2, 3)), tmp_path / "x.png")
    with pytest.raises(ValueError, match="coords"):
        plots.plot_tsne(np.zeros((5, 3)), np.zeros(5), tmp_path / "x.png")


def test_analyze_runs_writes_report(tmp_path):
    torch.manual_seed(0)
    switch = SwitchSAE(SwitchSAEConfig(d_in=16, n_experts=4, d_expert=8, k=2))
    topk = TopKSAE(TopKSAEConfig(d_in=16, d_sae=32, k=2))
    with torch.no_grad():
        topk.W_dec[1] = topk.W_dec[0]  # one planted duplicate pair: 2 of 32 features
    switch.save(tmp_path / "switch" / "final")
    (tmp_path / "switch" / "metrics.jsonl").write_text('{"mse": 9.0}\n{"mse": 5.0, "tokens_seen": 1000}\n')
    (tmp_path / "switch" / "eval.json").write_text(json.dumps({"l0": 2.0, "ce_loss_score": 0.8}))
    topk.save(tmp_path / "topk")
    (tmp_path / "topk" / "metrics.json").write_text(json.dumps({"mse": 4.0, "l0": 2.0}))
    assert find_sae_dir(tmp_path / "switch") == tmp_path / "switch" / "final"
    assert read_metrics(tmp_path / "switch") == {"mse": 5.0, "l0": 2.0, "loss_recovered": 0.8, "tokens": 1000.0}

    out = analyze_runs([tmp_path / "switch", tmp_path / "topk"], tmp_path / "report", activations=torch.randn(64, 16), tsne=False)
    report = json.loads((out / "report.json").read_text())
    sw, tk = report["runs"]
    assert (sw["label"], sw["n_experts"], tk["label"]) == ("switch-4", 4, "topk")
    assert tk["decoder"]["duplicate_fraction"]["0.9"] == pytest.approx(2 / 32)
    assert tk["decoder"]["duplicate_groups_0.9"]["count"] == 1
    assert len(sw["expert_similarity"]["matrix"]) == 4 and sw["train_flops"] > 0
    assert tk["random_block_similarity"]["n_blocks"] == 4  # the control uses the Switch run's expert count
    assert sum(sw["expert_stats"]["load"]) == pytest.approx(1.0)
    assert sw["parameters"] == sum(p.numel() for p in switch.parameters())
    for name in ("mse_vs_l0.png", "loss_recovered_vs_l0.png", "switch_expert_similarity.png", "switch_expert_load.png", "duplicate_fraction_vs_experts.png"):
        assert name in report["figures"]
        assert_png(out / name)
    summary = (out / "summary.md").read_text()
    assert "| switch | switch-4 | 32 | 4 |" in summary and "(random blocks)" in summary
    with pytest.raises(FileNotFoundError, match="no saved SAE"):
        analyze_runs([tmp_path / "report"], tmp_path / "again")


def test_analyze_runs_tsne(tmp_path):
    SwitchSAE(SwitchSAEConfig(d_in=8, n_experts=2, d_expert=12, k=2)).save(tmp_path / "run")
    out = analyze_runs([tmp_path / "run"], tmp_path / "report")
    for kind in ("decoder", "encoder"):
        assert_png(out / f"run_tsne_{kind}.png")
