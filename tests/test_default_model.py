"""The embedded default model and text (real weights and prose, no download), and the online
loading path exercised on a local stand-in."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformer_lens")
pytest.importorskip("transformers")

from switch_sae.activations import (  # noqa: E402
    DEFAULT_HOOK,
    default_model_available,
    default_text_available,
    default_text_files,
    harvest,
    load_default_model,
    load_model,
    load_tokens,
)
from switch_sae.activations.default_model import BOS_TOKEN, MODEL_INSTALL_HINT, TEXT_INSTALL_HINT  # noqa: E402
from switch_sae.evals import evaluate  # noqa: E402

needs_model = pytest.mark.skipif(not default_model_available(), reason=f"default model not installed: {MODEL_INSTALL_HINT}")
needs_text = pytest.mark.skipif(not default_text_available(), reason=f"default text not installed: {TEXT_INSTALL_HINT}")


@pytest.fixture(scope="module")
def model():
    return load_default_model()


@needs_text
def test_default_text_has_disjoint_train_and_eval_files():
    train, held_out = default_text_files("train"), default_text_files("eval")
    assert len(train) > 300 and 20 < len(held_out) < len(train) / 5
    assert not set(train) & set(held_out)
    assert default_text_files("eval") == held_out  # the split is deterministic
    assert "Python" in "".join(f.read_text() for f in held_out[:20])
    with pytest.raises(ValueError, match="split"):
        default_text_files("test")


@needs_model
def test_default_model_is_the_pretrained_smollm2(model):
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.d_vocab) == (30, 576, 49152)
    assert model.tokenizer.bos_token == BOS_TOKEN and model.tokenizer.bos_token_id == 0
    prompt = model.tokenizer("The capital of France is", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_token = model(prompt)[0, -1].argmax()
    assert model.tokenizer.decode(next_token).strip() == "Paris"  # a random model would not know


@needs_model
@needs_text
def test_default_model_on_default_text(model):
    tokens = load_tokens(default_text_files("eval")[:3], n_contexts=2, context_size=32, model=model)
    assert tokens.shape == (2, 32) and tokens[:, 0].eq(0).all()  # contexts start with <|endoftext|>
    with torch.no_grad():
        ce = float(model(tokens, return_type="loss"))
    assert ce < 5.0  # trained: far below the ln(49152) = 10.8 nats of a uniform guess
    acts = harvest(model, tokens, DEFAULT_HOOK, drop_first=True)[DEFAULT_HOOK]
    assert acts.shape == (2 * 31, 576) and torch.isfinite(acts).all()


@needs_model
def test_identity_splice_on_the_default_model(model):
    class Identity(torch.nn.Module):
        d_in = d_sae = 576
        cfg = type("Cfg", (), {"hook_name": DEFAULT_HOOK, "model_name": ""})()

        def forward(self, x):
            from switch_sae.models.base import ForwardOutput

            return ForwardOutput(x_hat=x, code=None, acts=torch.relu(x))

    tokens = load_tokens(["Sparse autoencoders split activations into features. " * 8], n_contexts=1, context_size=24, model=model)
    result = evaluate(Identity(), model, tokens, progress=False)
    assert result.loss_recovered_zero == pytest.approx(1.0, abs=1e-4)
    assert result.ce_zero > result.ce_clean + 1.0  # ablating a mid-layer residual stream hurts a trained model


def test_load_model_by_name_uses_the_transformerlens_loader(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    # A local HF folder stands in for a hub name such as "gpt2": same loader, no download.
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=60, n_positions=32, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    tokens = torch.randint(0, 60, (2, 8))
    acts = harvest(model, tokens, "blocks.1.hook_resid_post")["blocks.1.hook_resid_post"]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(acts, cache["blocks.1.hook_resid_post"].reshape(-1, 16), rtol=0, atol=0)
