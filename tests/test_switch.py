"""SwitchSAE (python/switch_sae/models/switch.py) against the dense-and-mask reference.

The model runs the compiled custom ops; ``reference.switch_forward`` computes every expert
densely and masks, as the paper's code does. Forward outputs and the gradients of every
parameter must agree, for one and for several active experts.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import switch_sae
from switch_sae import SAE, SwitchSAE, SwitchSAEConfig, reference
from switch_sae.ops import ExtensionMismatchError, check_build_matches

PARAMS = ("W_enc", "b_enc", "W_dec", "W_router", "b_router", "b_dec")


def make_model(seed=0, **overrides) -> SwitchSAE:
    cfg = dict(d_in=24, n_experts=4, d_expert=10, k=3)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = SwitchSAE(SwitchSAEConfig(**cfg))
    with torch.no_grad():  # non-trivial biases so that every term is exercised
        model.b_dec.normal_(0, 0.1)
        model.b_router.normal_(0, 0.1)
        if model.b_enc is not None:
            model.b_enc.normal_(0, 0.1)
    return model


def reference_forward(model: SwitchSAE, x: torch.Tensor):
    return reference.switch_forward(
        x.reshape(-1, model.d_in), model.encoder_weight(), model.b_enc, model.W_dec,
        model.W_router, model.b_router, model.b_dec, model.cfg.k, model.cfg.n_active, model.cfg.gate,
    )


def loss_of(x_hat, values, target, weights):
    # A loss touching both outputs, so gradients flow through decode and the gate.
    return ((x_hat - target) ** 2).sum() + (values * weights).sum()


def grads(model: SwitchSAE, use_reference: bool, x, target, weights):
    model.zero_grad()
    if use_reference:
        x_hat, values, *_ = reference_forward(model, x)
    else:
        out = model(x)
        x_hat, values = out.x_hat, out.values
    loss_of(x_hat, values, target, weights).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_extension_is_loaded():
    # The rest of this file compares the compiled ops to the reference; on the reference
    # fallback it would compare the reference to itself.
    if os.environ.get("SWITCH_SAE_DISABLE_EXTENSION") == "1":
        pytest.skip("extension disabled on purpose by SWITCH_SAE_DISABLE_EXTENSION=1")
    assert switch_sae.ops.HAS_EXTENSION, "switch_sae._C is not built/installed"
    assert hasattr(torch.ops.switch_sae, "encode_topk")


GATE_CASES = [(1, False, "prob"), (2, False, "prob"), (1, True, "prob"), (2, True, "prob"),
              (2, False, "renormalized"), (3, True, "renormalized"), (1, False, "renormalized")]


@pytest.mark.parametrize("n_active, use_encoder_bias, gate", GATE_CASES)
def test_forward_matches_reference(n_active, use_encoder_bias, gate):
    model = make_model(n_active=n_active, use_encoder_bias=use_encoder_bias, gate=gate)
    x = torch.randn(64, model.d_in)
    out = model(x)
    x_hat, values, indices, probs, experts = reference_forward(model, x)
    torch.testing.assert_close(out.x_hat, x_hat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.values, values, atol=1e-6, rtol=1e-5)
    active = values > 0  # ReLU zeros may tie, their ids are arbitrary
    assert torch.equal(out.indices[active], indices[active])
    torch.testing.assert_close(out.router_probs, probs)
    assert torch.equal(out.experts, experts)
    assert out.values.shape == (64, model.cfg.k) and out.indices.dtype == torch.int64


@pytest.mark.parametrize("n_active, use_encoder_bias, gate", GATE_CASES)
def test_gradients_match_reference(n_active, use_encoder_bias, gate):
    model = make_model(n_active=n_active, use_encoder_bias=use_encoder_bias, gate=gate)
    x, target = torch.randn(64, model.d_in), torch.randn(64, model.d_in)
    weights = torch.randn(64, model.cfg.k)
    ours = grads(model, False, x, target, weights)
    ref = grads(model, True, x, target, weights)
    assert set(ours) == {p for p in PARAMS if use_encoder_bias or p != "b_enc"}
    for name in ours:
        scale = ref[name].abs().max().clamp_min(1.0)
        err = (ours[name] - ref[name]).abs().max() / scale
        assert err <= 1e-4, f"grad of {name}: max error {err:.2e} relative to scale {scale:.2e}"


def test_renormalized_gates_sum_to_one_and_rescale_the_code():
    prob = make_model(n_active=2)
    renorm = make_model(n_active=2, gate="renormalized")
    x = torch.randn(32, prob.d_in)
    probs, gates, experts = reference.route(x, renorm.W_router, renorm.b_router, 2, "renormalized")
    torch.testing.assert_close(gates.sum(-1), torch.ones(32))
    torch.testing.assert_close(gates, probs.gather(1, experts) / probs.gather(1, experts).sum(-1, keepdim=True))
    a, b = prob(x), renorm(x)
    assert torch.equal(a.experts, b.experts) and not torch.allclose(a.values, b.values)
    single = make_model(n_active=1, gate="renormalized")
    assert torch.equal(single.route(x)[1], torch.ones(32, 1))  # one expert: the gate is always 1
    with pytest.raises(ValueError, match="gate must be one of"):
        SwitchSAEConfig(d_in=4, n_experts=2, d_expert=4, k=2, gate="softmax")
    with pytest.raises(ValueError, match="gate must be one of"):
        reference.route(x, prob.W_router, prob.b_router, 1, "top")


def test_gradients_reach_input():
    model = make_model(n_active=2, use_encoder_bias=True)
    x = torch.randn(16, model.d_in, dtype=torch.float32, requires_grad=True)
    model(x).x_hat.square().sum().backward()
    ours = x.grad.clone()
    x.grad = None
    reference_forward(model, x)[0].square().sum().backward()
    torch.testing.assert_close(ours, x.grad, atol=1e-4, rtol=1e-4)


def test_bfloat16_matches_float32_reference():
    model = make_model(d_in=32, d_expert=16, k=4).to(torch.bfloat16)
    x = torch.randn(256, model.d_in).to(torch.bfloat16)
    out = model(x)
    assert out.x_hat.dtype == torch.bfloat16
    # The reference runs in float32 on the same (bf16-rounded) parameters and inputs.
    # bf16 keeps 8 mantissa bits, so a token whose two best experts or k-th and (k+1)-th
    # features are nearly tied may pick differently; the bulk of tokens must agree closely.
    ref_x_hat = reference_forward(model.float(), x.float())[0]
    rel = (out.x_hat.float() - ref_x_hat).norm(dim=-1) / ref_x_hat.norm(dim=-1)  # [batch]
    assert (rel < 0.02).float().mean() > 0.95, f"per-token relative errors: {rel.sort().values[-20:]}"


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = make_model(n_active=2, use_encoder_bias=True)
    x = torch.randn(32, model.d_in)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled.x_hat, eager.x_hat)
    torch.testing.assert_close(compiled.values, eager.values)
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(k=1),
        dict(k=10),  # k == d_expert
        dict(n_experts=1),
        dict(d_expert=7, k=2),  # not a power of two
        dict(n_experts=3, n_active=3),  # every expert active
    ],
    ids=["k1", "k_eq_d_expert", "one_expert", "d_expert_7", "all_active"],
)
def test_awkward_shapes(overrides):
    model = make_model(**overrides)
    x = torch.randn(20, model.d_in)
    torch.testing.assert_close(model(x).x_hat, reference_forward(model, x)[0], atol=1e-5, rtol=1e-5)


def test_expert_with_no_tokens_gets_zero_gradient():
    model = make_model(n_experts=4)
    with torch.no_grad():
        model.W_router[2] = -10 * model.W_router[2].abs().sum() * torch.ones_like(model.W_router[2])
        model.b_router.zero_()
    x = torch.rand(32, model.d_in)  # positive inputs: expert 2's logit is very negative
    out = model(x)
    assert not (out.experts == 2).any()
    out.x_hat.square().sum().backward()
    assert torch.count_nonzero(model.W_enc.grad[2]) == 0
    assert torch.count_nonzero(model.W_dec.grad[2]) == 0
    assert torch.count_nonzero(model.W_enc.grad) > 0


@pytest.mark.parametrize("batch", [0, 1])
def test_tiny_batches(batch):
    model = make_model()
    x = torch.randn(batch, model.d_in, requires_grad=True)
    out = model(x)
    assert out.x_hat.shape == (batch, model.d_in) and out.values.shape == (batch, model.cfg.k)
    out.x_hat.sum().backward()
    assert x.grad.shape == x.shape
    if batch:
        torch.testing.assert_close(out.x_hat, reference_forward(model, x)[0], atol=1e-5, rtol=1e-5)


def test_leading_dims_and_non_contiguous_inputs():
    model = make_model()
    x = torch.randn(3, 5, 2 * model.d_in)[..., ::2]  # [batch, pos, d_in], non-contiguous
    assert not x.is_contiguous()
    out = model(x)
    assert out.x_hat.shape == (3, 5, model.d_in) and out.values.shape == (3, 5, model.cfg.k)
    torch.testing.assert_close(out.x_hat.reshape(-1, model.d_in), reference_forward(model, x)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.decode(model.encode(x)), out.x_hat)


def test_encode_dense_scatters_the_sparse_code():
    model = make_model(n_active=2)
    x = torch.randn(8, model.d_in)
    dense = model.encode_dense(x)
    code = model.encode(x)
    assert dense.shape == (8, model.d_sae)
    torch.testing.assert_close(dense.gather(1, code.indices), code.values)
    assert (dense != 0).sum(1).le(model.cfg.k).all()


def test_feature_scaling_starts_as_identity_and_learns():
    plain = make_model(seed=3)
    scaled = make_model(seed=3, feature_scaling=True)
    x = torch.randn(16, plain.d_in)
    torch.testing.assert_close(scaled(x).x_hat, plain(x).x_hat)
    with torch.no_grad():
        scaled.feature_w.fill_(0.5)
    mean_row = scaled.W_enc.mean(1, keepdim=True)  # T is the identity: A_LP = mean row
    expected = mean_row + 1.5 * (scaled.W_enc - mean_row)
    torch.testing.assert_close(scaled.encoder_weight(), expected)
    scaled(x).x_hat.square().sum().backward()
    assert scaled.feature_w.grad.abs().sum() > 0 and scaled.feature_T.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(k=11), "larger than an expert"),
        (dict(n_active=5), "n_active=5 exceeds n_experts=4"),
        (dict(d_expert=0), "d_expert must be a positive integer"),
        (dict(tile_rows=0), "tile_rows must be a positive integer"),
        (dict(dtype="int8"), "dtype must be one of"),
    ],
)
def test_bad_config_is_rejected(bad, message):
    cfg = dict(d_in=24, n_experts=4, d_expert=10, k=3) | bad
    with pytest.raises(ValueError, match=message):
        SwitchSAEConfig(**cfg)


def test_bad_input_is_rejected():
    model = make_model()
    with pytest.raises(ValueError, match=r"x must have shape \[..., d_in=24\]"):
        model(torch.randn(4, 23))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.ones(4, 24, dtype=torch.int64))
    with pytest.raises(ValueError, match="NaN or inf"):
        model(torch.full((4, 24), float("nan")))
    with pytest.raises(ValueError, match="NaN or inf"):
        model(torch.full((4, 24), float("inf")))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[0.0] * 24])


def test_save_load_round_trip(tmp_path):
    model = make_model(n_active=2, use_encoder_bias=True, feature_scaling=True, hook_name="blocks.1.hook_resid_post")
    model.save(tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "switch" and cfg["hook_name"] == "blocks.1.hook_resid_post"
    loaded = SAE.load(tmp_path / "sae")
    assert isinstance(loaded, SwitchSAE) and loaded.cfg == model.cfg
    x = torch.randn(8, model.d_in)
    torch.testing.assert_close(loaded(x).x_hat, model(x).x_hat)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        SwitchSAE.load(tmp_path)
    make_model().save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | {"architecture": "nonsense"}))
    with pytest.raises(ValueError, match="unknown architecture 'nonsense'"):
        SAE.load(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | {"d_expert": 11}))
    with pytest.raises(ValueError, match="cfg.json was edited after saving.*d_expert"):
        SAE.load(tmp_path)


def test_decoder_rows_unit_norm_and_parallel_grad_removal():
    model = make_model()
    torch.testing.assert_close(model.W_dec_flat.norm(dim=-1), torch.ones(model.d_sae))
    model(torch.randn(32, model.d_in)).x_hat.square().sum().backward()
    model.remove_decoder_parallel_grad_()
    parallel = (model.W_dec.grad.view(model.d_sae, -1) * model.W_dec_flat).sum(-1)
    assert parallel.abs().max() < 1e-5
    with torch.no_grad():
        model.W_dec.mul_(3.0)
    model.normalize_decoder_()
    torch.testing.assert_close(model.W_dec_flat.norm(dim=-1), torch.ones(model.d_sae))


def test_extension_refuses_other_torch_version():
    check_build_matches("2.13.0+cpu", "2.13.0+cpu")
    with pytest.raises(ExtensionMismatchError, match=r"with `pip install \.` from the switch_sae source tree"):
        check_build_matches("2.12.0+cpu", "2.13.0+cpu")


def test_hook_points_fire():
    model = make_model()
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = tuple(output.shape)  # returns None: observes, does not replace

        return hook

    for name in ("hook_sae_input", "hook_router_probs", "hook_sae_acts_post", "hook_sae_recons"):
        getattr(model, name).register_forward_hook(record(name))
    model(torch.randn(5, model.d_in))
    assert seen == {
        "hook_sae_input": (5, 24),
        "hook_router_probs": (5, 4),
        "hook_sae_acts_post": (5, 3),
        "hook_sae_recons": (5, 24),
    }
