"""FLOP and parameter accounting, checked against instantiated models and torch's FLOP counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from switch_sae import reference
from switch_sae.evals import flops
from switch_sae.models import (
    BatchTopKSAE, BatchTopKSAEConfig, GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig,
    ReLUSAE, ReLUSAEConfig, SwitchSAE, SwitchSAEConfig, TopKSAE, TopKSAEConfig,
)

MODELS = [
    lambda: SwitchSAE(SwitchSAEConfig(d_in=12, n_experts=3, d_expert=10, k=4)),
    lambda: SwitchSAE(SwitchSAEConfig(d_in=12, n_experts=3, d_expert=10, k=4, n_active=2, use_encoder_bias=True, feature_scaling=True)),
    lambda: TopKSAE(TopKSAEConfig(d_in=12, d_sae=30, k=4)),
    lambda: TopKSAE(TopKSAEConfig(d_in=12, d_sae=30, k=4, use_encoder_bias=False)),
    lambda: BatchTopKSAE(BatchTopKSAEConfig(d_in=12, d_sae=30, k=4)),
    lambda: ReLUSAE(ReLUSAEConfig(d_in=12, d_sae=30)),
    lambda: JumpReLUSAE(JumpReLUSAEConfig(d_in=12, d_sae=30)),
    lambda: GatedSAE(GatedSAEConfig(d_in=12, d_sae=30)),
]


@pytest.mark.parametrize("make", MODELS)
def test_parameter_formula_matches_models(make):
    sae = make()
    assert flops.parameter_count(sae) == flops.count_parameters(sae)
    assert flops.parameter_count(sae.cfg) == flops.count_parameters(sae)  # from the config alone


def matmul_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_switch_forward_matmuls_match_flop_counter():
    cfg = SwitchSAEConfig(d_in=16, n_experts=4, d_expert=12, k=3, n_active=2)
    sae, batch = SwitchSAE(cfg), 40
    x = torch.randn(batch, 16)

    def forward():  # the reference path: the same matmuls the kernels do
        _, gates, experts = reference.route(x, sae.W_router, sae.b_router, cfg.n_active)
        order, offsets = reference.dispatch(experts.reshape(-1), cfg.n_experts)
        values, indices = reference.encode_topk(x, sae.W_enc, None, sae.b_dec, order, offsets, cfg.n_active, cfg.k, 64)
        reference.decode(values[: batch], indices[: batch], sae.W_dec_flat)

    count = flops.flop_count(sae).forward
    expected = count["router_matmul"] + count["encoder_matmul"] + count["decoder_matmul"]
    assert matmul_flops(forward) == batch * expected
    assert count["encoder_matmul"] == 2 * cfg.n_active * cfg.d_expert * cfg.d_in


def test_dense_relu_forward_and_backward_match_flop_counter():
    sae, batch = ReLUSAE(ReLUSAEConfig(d_in=16, d_sae=48)), 20
    x = torch.randn(batch, 16)
    out = {}
    forward = matmul_flops(lambda: out.setdefault("y", sae(x).x_hat))
    backward = matmul_flops(lambda: out["y"].square().sum().backward())
    count = flops.flop_count(sae)
    assert forward == batch * (count.forward["encoder_matmul"] + count.forward["decoder_matmul"])
    matmul_terms = ("decoder_grad_code", "decoder_grad_W", "encoder_grad_W", "encoder_grad_x")
    assert backward == batch * sum(count.backward[t] for t in matmul_terms)


def test_sparse_backward_is_cheaper_and_step_amortises():
    topk = TopKSAE(TopKSAEConfig(d_in=64, d_sae=1024, k=8))
    sparse, dense = flops.flop_count(topk), flops.flop_count(topk, sparse_backward=False)
    assert sparse.backward_total < dense.backward_total
    assert dense.backward["encoder_grad_W"] == 2 * 1024 * 64
    assert sparse.backward["encoder_grad_W"] == 2 * 8 * 64
    step = sparse.step_per_token(128)
    assert step == pytest.approx(sparse.forward_total + sparse.backward_total + sum(sparse.per_step.values()) / 128)
    assert sparse.step_per_token(4096) < step
    assert flops.training_flops(topk, 4096 * 10, 4096) == pytest.approx(10 * 4096 * sparse.step_per_token(4096))


def test_flop_and_width_matched_configs():
    baseline = TopKSAE(TopKSAEConfig(d_in=32, d_sae=256, k=8, hook_name="blocks.3.hook_resid_post", dtype="float64"))
    base = flops.flop_count(baseline).forward
    fm = flops.flop_matched_config(baseline, 8)
    assert (fm.n_experts, fm.d_expert, fm.d_sae, fm.k) == (8, 256, 8 * 256, 8)
    assert (fm.hook_name, fm.dtype) == ("blocks.3.hook_resid_post", "float64")
    assert flops.flop_count(fm).forward["encoder_matmul"] == base["encoder_matmul"]
    wm = flops.width_matched_config(baseline.cfg, 8, n_active=2)
    assert (wm.d_sae, wm.d_expert, wm.n_active) == (256, 32, 2)
    assert flops.flop_count(flops.width_matched_config(baseline, 8)).forward["encoder_matmul"] * 8 == base["encoder_matmul"]
    with pytest.raises(ValueError, match="dividing"):
        flops.width_matched_config(baseline, 3)
    with pytest.raises(ValueError, match="k"):
        flops.flop_matched_config(ReLUSAE(ReLUSAEConfig(d_in=4, d_sae=8)), 2)
    with pytest.raises(ValueError, match="larger than an expert"):
        flops.width_matched_config(baseline, 64)  # d_expert 4 < k 8


def test_shape_validation():
    with pytest.raises(ValueError, match="architecture"):
        flops.SAEShape("moe", 4, 8)
    with pytest.raises(ValueError, match="k must be"):
        flops.SAEShape("topk", 4, 8, k=0)
    with pytest.raises(ValueError, match="switch"):
        flops.SAEShape("topk", 4, 8, k=2, n_experts=2)
    with pytest.raises(TypeError, match="architecture"):
        flops.flop_count(object())


def test_flop_matched_multi_expert_splits_the_width_over_the_active_experts():
    baseline = TopKSAEConfig(d_in=32, d_sae=256, k=8)
    base = flops.flop_count(baseline).forward["encoder_matmul"]
    for n_active in (1, 2, 4):
        fm = flops.flop_matched_config(baseline, 8, n_active=n_active)
        assert (fm.d_expert, fm.n_active, fm.d_sae) == (256 // n_active, n_active, 8 * 256 // n_active)
        assert flops.flop_count(fm).forward["encoder_matmul"] == base  # n_active experts of 1/n_active the width
    with pytest.raises(ValueError, match="n_active=3 must be a positive integer dividing the baseline's d_sae=256"):
        flops.flop_matched_config(baseline, 8, n_active=3)


def test_make_saes_builds_the_trio():
    baseline = TopKSAEConfig(d_in=16, d_sae=64, k=4, hook_name="blocks.1.hook_resid_post")
    saes = flops.make_saes(baseline, 4, seed=3)
    assert list(saes) == ["topk", "switch-flop", "switch-width"]
    assert isinstance(saes["topk"], TopKSAE) and saes["topk"].cfg is baseline
    assert saes["switch-flop"].cfg == flops.flop_matched_config(baseline, 4)
    assert saes["switch-width"].cfg == flops.width_matched_config(baseline, 4)
    again = flops.make_saes(baseline, 4, seed=3)  # seeded: the same initial weights
    assert all(torch.equal(saes[n].W_dec_flat, again[n].W_dec_flat) for n in saes)
    assert not torch.equal(flops.make_saes(baseline, 4, seed=4)["topk"].W_dec_flat, saes["topk"].W_dec_flat)
    multi = flops.make_saes(baseline, 4, n_active=2)
    assert (multi["switch-flop"].cfg.d_expert, multi["switch-width"].cfg.n_active) == (32, 2)
