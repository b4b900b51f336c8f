"""SAELens export/import, the SAEBench wrapper, and splicing into a HookedTransformer."""

import json

import pytest
import torch

from switch_sae.interop import (
    SAEBenchWrapper, export_to_saelens, import_from_saelens, is_exact_export, run_with_sae, splice_sae,
)
from switch_sae.models import (
    BatchTopKSAE, BatchTopKSAEConfig, GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig,
    ReLUSAE, ReLUSAEConfig, SwitchSAE, SwitchSAEConfig, TopKSAE, TopKSAEConfig,
)

D_IN, D_SAE = 16, 48
META = {"hook_name": "blocks.0.hook_resid_post", "model_name": "tiny"}


def randomised(sae):
    """Every parameter perturbed (biases non-zero, thresholds positive), decoder renormalised."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        if isinstance(sae, JumpReLUSAE):
            sae.log_threshold.copy_(torch.full_like(sae.log_threshold, -3.0) + 0.5 * torch.rand(D_SAE, generator=g))
        if isinstance(sae, BatchTopKSAE):
            sae.threshold.fill_(0.05)
        sae.normalize_decoder_()
    return sae.eval()


EXACT = {
    "switch1": lambda: SwitchSAE(SwitchSAEConfig(d_in=D_IN, n_experts=1, d_expert=D_SAE, k=5, use_encoder_bias=True, feature_scaling=True, **META)),
    "topk": lambda: TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, **META)),
    "topk_nobias": lambda: TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, use_encoder_bias=False, **META)),
    "batchtopk": lambda: BatchTopKSAE(BatchTopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, **META)),
    "relu": lambda: ReLUSAE(ReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, **META)),
    "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, **META)),
    "gated": lambda: GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, **META)),
}
SAELENS_ARCH = {"switch1": "topk", "topk": "topk", "topk_nobias": "topk", "batchtopk": "jumprelu",
                "relu": "standard", "jumprelu": "jumprelu", "gated": "gated"}


def x_batch(n=64):
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", list(EXACT))
def test_saelens_loads_our_export_with_same_reconstructions(name, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = randomised(EXACT[name]())
    export_to_saelens(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == SAELENS_ARCH[name] and cfg["metadata"]["hook_name"] == META["hook_name"]
    loaded = sae_lens.SAE.load_from_disk(str(tmp_path))
    assert loaded.W_enc.shape == (D_IN, D_SAE) and loaded.W_dec.shape == (D_SAE, D_IN)
    x = x_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sae(x).x_hat, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loaded.encode(x), sae.encode_dense(x), atol=1e-5, rtol=1e-5)
    assert is_exact_export(tmp_path)


@pytest.mark.parametrize("name", list(EXACT))
def test_round_trip_through_saelens_format(name, tmp_path):
    sae = randomised(EXACT[name]())
    export_to_saelens(sae, tmp_path)
    back = import_from_saelens(tmp_path)
    # A one-expert Switch SAE comes back as the TopK SAE it is; SAELens stores BatchTopK as JumpReLU.
    assert type(back) is {"switch1": TopKSAE, "batchtopk": JumpReLUSAE}.get(name, type(sae))
    assert back.cfg.hook_name == META["hook_name"] and back.cfg.model_name == "tiny"
    x = x_batch()
    with torch.no_grad():
        torch.testing.assert_close(back(x).x_hat, sae(x).x_hat, atol=1e-5, rtol=1e-5)


def test_multi_expert_switch_is_refused_unless_approximate(tmp_path):
    sae = randomised(SwitchSAE(SwitchSAEConfig(d_in=D_IN, n_experts=4, d_expert=12, k=3, **META)))
    with pytest.raises(ValueError, match="approximate=True"):
        export_to_saelens(sae, tmp_path / "exact")
    export_to_saelens(sae, tmp_path / "approx", approximate=True)
    assert not is_exact_export(tmp_path / "approx")
    back = import_from_saelens(tmp_path / "approx")
    torch.testing.assert_close(back.W_dec_flat, sae.W_dec_flat)  # the dictionary itself is kept
    x = x_batch()
    with torch.no_grad():
        assert not torch.allclose(back(x).x_hat, sae(x).x_hat, atol=1e-3)  # but not the routing


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "gated", "topk"])
def test_import_saelens_made_sae_folds_norms_and_input_bias(arch, tmp_path):
    pytest.importorskip("sae_lens")
    from sae_lens.registry import get_sae_class

    sae_cls, cfg_cls = get_sae_class(arch)
    extra = {"k": 6, "rescale_acts_by_decoder_norm": True} if arch == "topk" else {}
    lens = sae_cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False, **extra))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in lens.named_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        if arch == "jumprelu":
            lens.threshold.copy_(0.05 + 0.1 * torch.rand(D_SAE, generator=g))
        lens.W_dec.mul_(torch.rand(D_SAE, 1, generator=g) + 0.5)  # decoder rows far from unit norm
    lens.save_model(tmp_path)
    ours = import_from_saelens(tmp_path)
    torch.testing.assert_close(ours.W_dec_flat.norm(dim=-1), torch.ones(D_SAE))
    x = x_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).x_hat, lens(x), atol=1e-5, rtol=1e-5)


def test_import_refuses_what_does_not_map(tmp_path):
    sae = randomised(EXACT["topk"]())
    export_to_saelens(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    weights = tmp_path / "sae_weights.safetensors"
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    save_file({**state, "W_dec": state["W_dec"] * 2}, str(weights))
    with pytest.raises(ValueError, match="not unit norm"):
        import_from_saelens(tmp_path)
    for key, value, message in (("normalize_activations", "layer_norm", "normalize_activations"),
                                 ("architecture", "transcoder", "no switch_sae equivalent")):
        (tmp_path / "cfg.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=message):
            import_from_saelens(tmp_path)
    with pytest.raises(FileNotFoundError, match="SAELens"):
        import_from_saelens(tmp_path / "missing")
    with pytest.raises(TypeError, match="switch_sae SAE"):
        export_to_saelens(torch.nn.Linear(2, 2), tmp_path / "x")


@pytest.mark.parametrize("make", [
    lambda: SwitchSAE(SwitchSAEConfig(d_in=D_IN, n_experts=4, d_expert=12, k=3, n_active=2, **META)),
    EXACT["gated"], EXACT["batchtopk"],
])
def test_saebench_wrapper_interface(make):
    sae = randomised(make())
    bench = SAEBenchWrapper(sae)
    x = torch.randn(3, 5, D_IN)  # SAEBench passes [batch, pos, d_in]
    with torch.no_grad():
        f = bench.encode(x)
        assert f.shape == (3, 5, D_SAE)
        torch.testing.assert_close(bench(x), sae(x).x_hat, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bench.decode(f), sae(x).x_hat, atol=1e-5, rtol=1e-5)
    assert bench.W_enc.shape == (D_IN, D_SAE) and bench.W_dec.shape == (D_SAE, D_IN)
    assert bench.b_enc.shape == (D_SAE,) and bench.b_dec.shape == (D_IN,)
    assert bench.check_decoder_norms()
    cfg = bench.cfg
    assert (cfg.hook_name, cfg.hook_layer, cfg.d_sae, cfg.architecture) == (META["hook_name"], 0, D_SAE, sae.architecture)
    assert cfg.metadata.hook_name == META["hook_name"] and cfg.dtype == "float32"
    bench.to(dtype=torch.float64)
    assert bench.dtype == torch.float64 and bench.cfg.dtype == "float64" and bench.encode(x).dtype == torch.float64


def test_saebench_wrapper_needs_hook_metadata():
    with pytest.raises(ValueError, match="hook_name and model_name"):
        SAEBenchWrapper(TopKSAE(TopKSAEConfig(d_in=4, d_sae=8, k=2)))
    with pytest.raises(ValueError, match="layer"):
        SAEBenchWrapper(TopKSAE(TopKSAEConfig(d_in=4, d_sae=8, k=2, hook_name="hook_embed", model_name="m")))


def test_splice_replaces_activation_and_error_term_restores_it(tiny_lm):  # conftest.py: each model kind
    sae = randomised(SwitchSAE(SwitchSAEConfig(d_in=D_IN, n_experts=2, d_expert=16, k=4, **META)))
    tokens = torch.randint(0, 23, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        clean = tiny_lm(tokens)
        manual = tiny_lm.run_with_hooks(tokens, fwd_hooks=[(META["hook_name"], lambda a, hook: sae(a).x_hat)])
        spliced = run_with_sae(tiny_lm, sae, tokens)
        torch.testing.assert_close(spliced, manual)
        assert not torch.allclose(spliced, clean, atol=1e-3)
        with splice_sae(tiny_lm, sae, use_error_term=True) as model:
            torch.testing.assert_close(model(tokens), clean, atol=1e-5, rtol=1e-5)
            # An intervention through the SAE's own hook changes only what it should: the error
            # term stays that of the un-intervened reconstruction.
            sae.hook_sae_acts_post.add_hook(lambda acts, hook: acts * 0)
            try:
                ablated = model(tokens)
            finally:
                sae.reset_hooks()
        b_dec_only = tiny_lm.run_with_hooks(
            tokens, fwd_hooks=[(META["hook_name"], lambda a, hook: a - sae(a).x_hat + sae.b_dec)])
        torch.testing.assert_close(ablated, b_dec_only, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tiny_lm(tokens), clean)  # hooks gone after the block


def test_splice_errors(tiny_lm):
    sae = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=2))
    with pytest.raises(ValueError, match="hook_name is empty"):
        with splice_sae(tiny_lm, sae):
            pass
    with pytest.raises(ValueError, match="not a hook"):
        with splice_sae(tiny_lm, sae, hook_name="blocks.9.hook_resid_post"):
            pass
    narrow = TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=2, **META))
    with pytest.raises(ValueError, match="width"), splice_sae(tiny_lm, narrow):
        tiny_lm(torch.zeros(1, 4, dtype=torch.long))
