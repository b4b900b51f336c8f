"""The baseline SAEs: the maths of each architecture against plain dense PyTorch,
the shared interface, persistence and config validation."""

import pytest
import torch

from switch_sae import (
    SAE,
    BatchTopKSAE,
    BatchTopKSAEConfig,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    ReLUSAE,
    ReLUSAEConfig,
    SwitchSAE,
    SwitchSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)

D_IN, D_SAE, K = 12, 40, 3


def make(arch: str, **kw):
    torch.manual_seed(0)
    makers = {
        "topk": lambda: TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, **kw)),
        "batchtopk": lambda: BatchTopKSAE(BatchTopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, **kw)),
        "relu": lambda: ReLUSAE(ReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, **kw)),
        "gated": lambda: GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, **kw)),
        "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, threshold_init=0.2, **kw)),
    }
    model = makers[arch]()
    with torch.no_grad():  # nonzero biases so that they are exercised
        for name, p in model.named_parameters():
            if name.startswith("b_") or name == "r_mag":
                p.normal_(0, 0.1)
    return model


ARCHS = ["topk", "batchtopk", "relu", "gated", "jumprelu"]


@pytest.mark.parametrize("arch", ARCHS)
def test_interface_shapes_and_unit_decoder(arch):
    model = make(arch)
    assert isinstance(model, SAE) and model.d_sae == D_SAE and model.architecture == arch
    assert model.W_dec_flat.shape == (D_SAE, D_IN)
    torch.testing.assert_close(model.W_dec_flat.norm(dim=-1), torch.ones(D_SAE))
    torch.testing.assert_close(model.W_enc, model.W_dec)  # parallel start (paper, appendix A)
    x = torch.randn(2, 5, D_IN)  # leading dims are kept
    out = model(x)
    assert out.x_hat.shape == (2, 5, D_IN)
    dense = model.encode_dense(x)
    assert dense.shape == (2, 5, D_SAE)
    torch.testing.assert_close(out.x_hat, dense @ model.W_dec + model.b_dec)
    code = model.encode(x)
    torch.testing.assert_close(model.decode(code), out.x_hat)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path):
    model = make(arch)
    model.eval()
    x = torch.randn(7, D_IN)
    if arch == "batchtopk":
        model.train()
        model(x)  # sets the inference threshold
        model.eval()
    model.save(tmp_path / arch)
    loaded = SAE.load(tmp_path / arch)
    assert type(loaded) is type(model) and loaded.cfg == model.cfg
    loaded.eval()
    torch.testing.assert_close(loaded(x).x_hat, model(x).x_hat)
    with pytest.raises(ValueError, match="holds a"):
        (TopKSAE if arch != "topk" else ReLUSAE).load(tmp_path / arch)


def test_topk_is_dense_topk_and_a_one_expert_switch():
    model = make("topk")
    x = torch.randn(9, D_IN)
    pre = torch.relu((x - model.b_dec) @ model.W_enc.T + model.b_enc)
    top = pre.topk(K, dim=-1)
    code = model.encode(x)
    torch.testing.assert_close(code.values, top.values)
    assert torch.equal(code.indices, top.indices)
    switch = SwitchSAE(SwitchSAEConfig(d_in=D_IN, n_experts=1, d_expert=D_SAE, k=K, use_encoder_bias=True))
    with torch.no_grad():
        switch.W_enc.copy_(model.W_enc.unsqueeze(0))
        switch.W_dec.copy_(model.W_dec.unsqueeze(0))
        switch.b_enc.copy_(model.b_enc.unsqueeze(0))
        switch.b_dec.copy_(model.b_dec)
    torch.testing.assert_close(switch(x).x_hat, model(x).x_hat)  # the only gate is softmax = 1


def test_topk_gradients_match_dense_autograd():
    model = make("topk")
    x = torch.randn(6, D_IN)
    model(x).x_hat.pow(2).sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    W_enc, W_dec, b_enc, b_dec = (p.detach().clone().requires_grad_() for p in (model.W_enc, model.W_dec, model.b_enc, model.b_dec))
    pre = (x - b_dec) @ W_enc.T + b_enc
    top = pre.topk(K, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    (acts @ W_dec + b_dec).pow(2).sum().backward()
    for name, ref in {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}.items():
        torch.testing.assert_close(got[name], ref.grad, msg=name)


def test_batchtopk_keeps_k_times_batch_in_training_and_threshold_at_inference():
    model = make("batchtopk")
    model.train()
    x = torch.randn(10, D_IN)
    out = model(x)
    pre = torch.relu((x - model.b_dec) @ model.W_enc.T + model.b_enc)
    keep = torch.zeros(pre.numel(), dtype=torch.bool)
    keep[pre.flatten().topk(K * 10).indices] = True
    expected = pre * keep.view_as(pre)
    dense = torch.zeros_like(pre).scatter_add(-1, out.code.indices, out.code.values)
    torch.testing.assert_close(dense, expected)
    counts = (out.code.values > 0).sum(-1)
    assert counts.sum() == K * 10 and counts.max() > counts.min()  # the budget is shared
    smallest = expected[expected > 0].min().double()
    assert model.threshold.item() == pytest.approx(smallest.item())  # first batch sets it
    assert out.aux["threshold"].item() == pytest.approx(smallest.item())
    x2 = torch.randn(10, D_IN)
    model(x2)
    pre2 = torch.relu((x2 - model.b_dec) @ model.W_enc.T + model.b_enc)
    smallest2 = pre2.flatten().topk(K * 10).values.min().double()
    assert model.threshold.item() == pytest.approx((0.99 * smallest + 0.01 * smallest2).item())
    model.eval()
    threshold = model.threshold.item()
    x3 = torch.randn(4, D_IN)
    pre3 = torch.relu((x3 - model.b_dec) @ model.W_enc.T + model.b_enc)
    torch.testing.assert_close(model.encode_dense(x3), pre3 * (pre3 > threshold))
    model(x3)
    assert model.threshold.item() == threshold  # inference does not move it


def test_relu_and_gated_match_their_formulas():
    x = torch.randn(8, D_IN)
    relu = make("relu")
    torch.testing.assert_close(relu.encode(x), torch.relu((x - relu.b_dec) @ relu.W_enc.T + relu.b_enc))
    gated = make("gated")
    gated.train()
    pre = (x - gated.b_dec) @ gated.W_enc.T
    pi_gate = pre + gated.b_gate
    pi_mag = (x - gated.b_dec) @ (gated.W_enc * gated.r_mag.exp().unsqueeze(-1)).T + gated.b_mag
    out = gated(x)
    torch.testing.assert_close(out.acts, (pi_gate > 0) * torch.relu(pi_mag))
    torch.testing.assert_close(out.aux["gate_acts"], torch.relu(pi_gate))
    terms = gated.training_terms(x, out)
    assert sorted(terms) == ["gate_aux", "l1", "mse"]
    # the gate-path reconstruction must not train the decoder
    terms["gate_aux"].backward()
    assert gated.W_dec.grad is None and gated.b_dec.grad is not None  # b_dec only via the encoder
    assert gated.W_enc.grad is not None and gated.b_gate.grad is not None


def test_jumprelu_straight_through_threshold_gradient():
    model = make("jumprelu", bandwidth=0.5)
    x = torch.randn(16, D_IN)
    out = model(x)
    pre, theta = out.aux["pre_acts"].detach(), model.threshold.detach()
    torch.testing.assert_close(out.acts, pre * (pre > theta))
    out.acts.sum().backward()
    window = ((pre - theta).abs() < 0.25).float()
    expected = (-(theta / 0.5) * window).sum(0) * theta  # d/d log_threshold = theta * d/d theta
    torch.testing.assert_close(model.log_threshold.grad, expected)


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (TopKSAEConfig, dict(d_in=4, d_sae=8, k=9), "k=9"),
        (TopKSAEConfig, dict(d_in=4, d_sae=0, k=1), "d_sae"),
        (TopKSAEConfig, dict(d_in=4, d_sae=8, k=2, tile_rows=0), "tile_rows"),
        (BatchTopKSAEConfig, dict(d_in=4, d_sae=8, k=2, threshold_lr=0.0), "threshold_lr"),
        (ReLUSAEConfig, dict(d_in=4, d_sae=8, dtype="float8"), "dtype"),
        (GatedSAEConfig, dict(d_in=-1, d_sae=8), "d_in"),
        (JumpReLUSAEConfig, dict(d_in=4, d_sae=8, bandwidth=0.0), "bandwidth"),
        (JumpReLUSAEConfig, dict(d_in=4, d_sae=8, threshold_init=-1.0), "threshold_init"),
    ],
)
def test_bad_configs_are_rejected(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize("arch", ARCHS)
def test_bad_inputs_name_the_problem(arch):
    model = make(arch)
    with pytest.raises(ValueError, match="d_in"):
        model(torch.randn(3, D_IN + 1))
    with pytest.raises(TypeError, match="floating"):
        model(torch.ones(3, D_IN, dtype=torch.int64))


@pytest.mark.parametrize("arch", ARCHS)
def test_hook_points_fire(arch):
    model = make(arch)
    seen = {}
    for name in ("hook_sae_input", "hook_sae_acts_post", "hook_sae_recons"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.shape[-1]))
    model(torch.randn(4, D_IN))
    width = K if arch == "topk" else seen["hook_sae_acts_post"]
    assert seen == {"hook_sae_input": D_IN, "hook_sae_acts_post": width, "hook_sae_recons": D_IN}
    if arch in ("relu", "gated", "jumprelu"):
        assert width == D_SAE
