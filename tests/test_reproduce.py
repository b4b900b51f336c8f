"""Tests of switch_sae.experiments.reproduce: the sweeps end to end at tiny sizes, through the CLI."""

from __future__ import annotations

import json
import math

import pytest

from switch_sae import cli
from switch_sae.experiments.reproduce import ReproduceConfig, planned_runs, _identity

TINY = dict(context_size=32, train_tokens=512, eval_contexts=2, batch_size=128, harvest_batch=8, d_sae=64,
            ks=(4, 8), n_experts=4, expert_counts=(1, 2, 4), expert_k=4, l1_coefficients=(1.0,), progress=False)
TINY_ARGV = ["--context-size", "32", "--train-tokens", "512", "--eval-contexts", "2", "--batch-size", "128",
             "--harvest-batch", "8", "--d-sae", "64", "--ks", "4", "8", "--n-experts", "4", "--expert-counts", "1", "2",
             "4", "--expert-k", "4", "--l1-coefficients", "1.0", "--no-progress"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ks=(0, 4)), "ks must be positive integers"),
        (dict(expert_counts=(3,)), "n_experts=3 must divide d_sae=2048"),
        (dict(d_sae=256, ks=(16,), expert_counts=(16,), expert_k=32), "exceeds the width-matched experts' d_expert=16"),
        (dict(l1_coefficients=(0.0,)), "l1_coefficients must be finite positive"),
        (dict(cache_activations=False), "harvests once"),
    ],
)
def test_bad_options_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ReproduceConfig(**kwargs)


def test_defaults_are_the_documented_sweep():
    cfg = ReproduceConfig()
    assert (cfg.ks, cfg.expert_counts, cfg.expert_k, cfg.d_sae) == ((16, 32, 64), (1, 2, 4, 8, 16), 32, 2048)
    assert cfg.eval_contexts * cfg.context_size >= 8192 and cfg.cache_activations


def test_shared_runs_are_planned_once():
    cfg = ReproduceConfig(**TINY, device="cpu").resolved()
    runs = planned_runs(cfg, d_in=16)
    names = [r.name for r in runs]
    assert len(names) == len(set(names)) == 2 * 3 + 3 * 2 + 2
    identity = {r.name: _identity(r) for r in runs}
    # n_experts=4 at k=4 is the k sweep's point; one expert makes FLOP- and width-matched the same SAE.
    assert identity["switch-flop-n4"] == identity["switch-flop-k4"]
    assert identity["switch-width-n1"] == identity["switch-flop-n1"]
    assert len(set(identity.values())) == len(runs) - 3
    by_name = {r.name: r.sae for r in runs}
    assert by_name["switch-flop-k8"].d_sae == 4 * 64 and by_name["switch-width-k8"].d_sae == 64
    assert by_name["relu-l1-1"].d_sae == 64


def test_reproduce_end_to_end_and_continue(tmp_path, patched_lm, capsys):
    out = tmp_path / "run"
    assert cli.main(["reproduce", "--out", str(out), *TINY_ARGV]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert len(rows) == 14
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted({r["trained_as"] for r in rows.values()})
    assert len(list((out / "runs").iterdir())) == 11
    for k in (4, 8):
        topk, flop, width = (rows[f"{s}-k{k}"] for s in ("topk", "switch-flop", "switch-width"))
        assert (topk["d_sae"], flop["d_sae"], width["d_sae"]) == (64, 256, 64)
        assert flop["flops_per_token"] < 1.1 * topk["flops_per_token"] and width["flops_per_token"] < topk["flops_per_token"]
        assert 0 < topk["l0"] <= k and 0 < flop["l0"] <= k
    assert rows["switch-flop-n4"]["mse"] == rows["switch-flop-k4"]["mse"]  # the shared point, trained once
    assert [rows[f"switch-flop-n{n}"]["n_experts"] for n in (1, 2, 4)] == [1, 2, 4]
    for row in rows.values():
        assert math.isfinite(row["mse"]) and row["mse"] > 0 and row["l0"] > 0 and row["train_flops"] > 0
        assert 0 <= row["unseen_floor"] <= 1 and 0 <= row["duplicate_fraction"] <= 1
        assert row["dead_source"] in ("eval", "training", None)
    assert rows["relu-l1-1"]["l1_coefficient"] == 1.0 and rows["relu-l1-1"]["series"] == "relu"
    for name in ("mse_vs_l0", "mse_vs_flops", "loss_recovered_vs_l0", "duplicate_fraction_vs_experts"):
        png = (out / "figures" / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) < 200_000
        assert f"figures/{name}.png" in (out / "results.md").read_text()
    assert all(f"| {n} |" in (out / "results.md").read_text() for n in rows)
    assert not (out / "activations").exists()
    assert "switch-width-n2" in capsys.readouterr().out

    # The same command again continues the run: nothing is retrained, the numbers are the same.
    assert cli.main(["reproduce", "--out", str(out), *TINY_ARGV]) == 0
    again = {r["name"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert all(again[n]["mse"] == pytest.approx(rows[n]["mse"], rel=1e-6) for n in rows)
    assert "already trained" in capsys.readouterr().err
    # ... but not with other sizes.
    assert cli.main(["reproduce", "--out", str(out), *TINY_ARGV, "--expert-k", "8"]) == cli.EXIT_USAGE
    assert "differ from its run" in capsys.readouterr().err
