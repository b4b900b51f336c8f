"""Smoke tests of the benchmark runner (the benchmarks package): quick mode end to end, the
records' schema, and that validation catches a wrong implementation. No timing assertions."""

from __future__ import annotations

import json

import pytest
import torch

from switch_sae import ops, reference
from benchmarks import QUICK, BenchConfig, ValidationError, check_close, run
from benchmarks.cases_ops import op_inputs, validate_op
from benchmarks.cases_train import dense_mask_forward, routed_forward, switch_model, validate_switch
from benchmarks.report import ratios

REQUIRED = ("name", "n_experts", "d_in", "d_sae", "batch", "k", "status", "versions", "machine")
TIMED = ("median_ms", "q25_ms", "q75_ms", "min_ms", "max_ms", "repeats", "peak_mb", "validation")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(**{**QUICK, "repeats": 2, "warmup": 0}, cases=("train", "memory", "gemm", "ops", "optimiser"),
                      peers=False, subprocess=False, out=str(out), quick=True)
    return run(cfg, echo=lambda *_: None), out


def test_quick_run_writes_records_with_the_schema(quick_run):
    records, out = quick_run
    assert json.loads((out / "latest.json").read_text()) == records
    assert (out / "step_time.png").stat().st_size > 0 and (out / "breakdown.png").stat().st_size > 0
    names = {r["name"] for r in records}
    assert {"switch_sae", "dense_mask_reference", "routed_gemm_limit", "gemm_peak", "op_encode_topk"} <= names
    assert {("optimiser_update", "whole_matrix"), ("optimiser_update", "blocked"), ("optimiser_adam", "blocked")} <= {
        (r["name"], r["variant"]) for r in records}
    for r in records:
        assert r["status"] == "ok", r
        for key in REQUIRED + TIMED:
            assert key in r, (key, r["name"])
        assert r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["versions"]["torch"] == torch.__version__
        assert r["machine"]["torch_threads"] == QUICK["threads"]
    steps = [r for r in records if r["name"] == "switch_sae" and r["variant"] is None]
    assert sorted(r["n_experts"] for r in steps) == sorted(QUICK["n_experts"])
    assert all(r["d_sae"] == QUICK["d_sae"] and r["batch"] == QUICK["batch"] for r in steps)
    assert all(set(r["phases_ms"]) == {"forward", "backward", "optimizer"} for r in steps)
    sweep = [r for r in records if r["variant"] == "memory_sweep"]
    assert sorted({r["batch"] for r in sweep}) == [QUICK["batch"] // 4, QUICK["batch"] // 2]
    assert all(r["n_experts"] == max(QUICK["n_experts"]) for r in sweep)
    rows = ratios(records)
    assert [row["n_experts"] for row in rows] == sorted(QUICK["n_experts"])
    assert all(row["speedup_vs_dense_mask"] > 0 for row in rows)
    for r in records:  # every timed record but the two that define the rates has a roofline
        if r["name"] not in ("gemm_peak", "memory_bandwidth", "memory_bandwidth_inplace"):
            assert r["roofline_ms"] > 0 and r["roofline_ratio"] == pytest.approx(r["median_ms"] / r["roofline_ms"])
    assert all(row["step_over_roofline"] > 0 for row in rows)
    summary = (out / "summary.md").read_text()
    assert "## Roofline: measured against the machine's limits" in summary and "H100 SXM" in summary


def test_validation_passes_for_the_real_forward_and_catches_a_wrong_one():
    torch.manual_seed(0)
    model = switch_model(d_in=16, d_sae=64, n_experts=4, k=4)
    x = torch.randn(32, 16)
    assert validate_switch(routed_forward, model, x)["max_abs_err"] < 1e-4

    def wrong_forward(model, x):  # a decoder that forgets b_dec
        x_hat, probs, experts = dense_mask_forward(model, x)
        return x_hat - model.b_dec, probs, experts

    with torch.no_grad():
        model.b_dec.normal_()
    with pytest.raises(ValidationError, match="x_hat"):
        validate_switch(wrong_forward, model, x)


def test_validation_catches_a_wrong_gradient():
    torch.manual_seed(0)
    model = switch_model(d_in=16, d_sae=64, n_experts=4, k=4)
    x = torch.randn(32, 16)

    def detached_router(model, x):  # same outputs, but the router gets no gradient
        x_hat, probs, experts = dense_mask_forward(model, x)
        return x_hat, probs.detach(), experts

    with pytest.raises(ValidationError, match="W_router"):
        validate_switch(detached_router, model, x)


def test_op_validation_catches_a_wrong_kernel():
    spec = {**QUICK, "seed": 0}
    args = op_inputs(spec, n_experts=4)["decode"]
    assert validate_op("decode", reference.decode, args)["max_abs_err"] == 0.0
    with pytest.raises(ValidationError, match="decode output 0"):
        validate_op("decode", lambda v, i, W: reference.decode(v, i.flip(-1).roll(1, 0), W), args)


def test_encode_topk_validation_accepts_reordered_ties_and_catches_wrong_selections():
    spec = {**QUICK, "seed": 0}
    x, W_enc, b_enc, b_dec, order, offsets, n_active, k, tile_rows = op_inputs(spec, n_experts=4)["encode_topk"]
    d_expert = W_enc.shape[1]
    # Two features of expert 0 with equal weights tie exactly for every token.
    W_enc = W_enc.clone()
    W_enc[0, 1] = W_enc[0, 0]
    args = (x, W_enc, b_enc, b_dec, order, offsets, n_active, k, tile_rows)
    assert validate_op("encode_topk", ops.encode_topk, args)["max_abs_err"] < 1e-4

    def tied_swapped(*a):  # the tied features 0 and 1 in the other order: still a valid top k
        values, indices = ops.encode_topk(*a)
        return values, torch.where(indices == 0, 1, torch.where(indices == 1, 0, indices))

    assert validate_op("encode_topk", tied_swapped, args)["max_abs_err"] < 1e-4
    wrong = {
        "values": lambda *a: (ops.encode_topk(*a)[0] * 1.01, ops.encode_topk(*a)[1]),
        "chosen features": lambda *a: (ops.encode_topk(*a)[0], ops.encode_topk(*a)[1] ^ 1),  # same expert
        "expert": lambda *a: (ops.encode_topk(*a)[0], (ops.encode_topk(*a)[1] + d_expert) % (4 * d_expert)),
    }
    for match, fn in wrong.items():
        with pytest.raises(ValidationError, match=match):
            validate_op("encode_topk", fn, args)


def test_check_close_rejects_shape_and_nan():
    with pytest.raises(ValidationError, match="shape"):
        check_close("t", torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValidationError, match="NaN"):
        check_close("t", torch.tensor([float("nan")]), torch.tensor([0.0]))


def test_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="n_experts=3"):
        BenchConfig(d_sae=64, k=4, n_experts=(3,))
    with pytest.raises(ValueError, match="cases"):
        BenchConfig(cases=("train", "bogus"))


def test_step_case_plans_our_step_alone():
    from benchmarks.runner import plan

    specs = plan(BenchConfig(n_experts=(16, 64), cases=("step", "gemm", "ops")))
    assert [(s["name"], s["n_experts"]) for s in specs if s["family"] == "train"] == [("switch_sae", 16), ("switch_sae", 64)]
    assert [s["family"] for s in specs if s["family"] != "train"] == ["gemm", "ops"]
    both = plan(BenchConfig(n_experts=(16,), cases=("train", "step"), peers=False))
    assert [s["name"] for s in both] == ["switch_sae", "dense_mask_reference"]  # "train" already holds our step


def test_a_preloaded_malloc_is_checked_planned_and_kept_out_of_memory_peaks(tmp_path, monkeypatch):
    from benchmarks.measure import peak_memory
    from benchmarks.report import step_peak_mb
    from benchmarks.runner import plan

    with pytest.raises(ValueError, match="not a file"):
        BenchConfig(malloc=str(tmp_path / "libnone.so"))
    library = tmp_path / "libtcmalloc_minimal.so.4"
    library.write_bytes(b"")
    with pytest.raises(ValueError, match="subprocess"):
        BenchConfig(malloc=str(library), subprocess=False)
    # Under a preloaded malloc the timed steps cannot see their peak: the memory sweep then
    # also runs the full batch, at every n_experts.
    cfg = BenchConfig(n_experts=(16, 64), cases=("memory",), malloc=str(library))
    assert sorted((s["batch"], s["n_experts"]) for s in plan(cfg) if s["name"] == "switch_sae") == [
        (1024, 64), (2048, 64), (4096, 16), (4096, 64)]
    assert len(plan(BenchConfig(n_experts=(16, 64), cases=("memory",)))) == 4  # glibc: half and quarter batch

    x = torch.randn(1 << 18)
    assert peak_memory(lambda: x * 2)["peak_mb"] is not None
    monkeypatch.setenv("LD_PRELOAD", str(library))
    measured = peak_memory(lambda: x * 2)
    assert measured["peak_mb"] is None and measured["resting_mb"] > 0

    timed = {"status": "ok", "name": "switch_sae", "n_experts": 64, "batch": 4096, "variant": None, "peak_mb": None}
    swept = {**timed, "variant": "memory_sweep", "peak_mb": 70.0}
    assert step_peak_mb([timed, swept], "switch_sae", 64, 4096) == 70.0
    assert step_peak_mb([timed], "switch_sae", 64, 4096) is None
