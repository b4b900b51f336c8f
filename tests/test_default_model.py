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
    load_model,
    load_tokens,
)
from switch_sae.activations.default_model import BOS_TOKEN, MODEL_INSTALL_HINT, TEXT_INSTALL_HINT  # noqa: E402
from switch_sae.evals import evaluate  # noqa: E402

from lm_models import has_hooked_transformer  # noqa: E402

needs_model = pytest.mark.skipif(not default_model_available(), reason=f"default model not installed: {MODEL_INSTALL_HINT}")
needs_text = pytest.mark.skipif(not default_text_available(), reason=f"default text not installed: {TEXT_INSTALL_HINT}")


@pytest.fixture
def model(default_lm):  # conftest.py: loaded once per session
    return default_lm


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


# -- the online path, on a stand-in ------------------------------------------------------

# load_model's two loaders: HookedTransformer.from_pretrained (TransformerLens 2/3) and
# TransformerBridge.boot_transformers (TransformerLens 4, forced here on 3).
LOADERS = (["HookedTransformer"] if has_hooked_transformer() else []) + ["TransformerBridge"]
GPT2_REVISION = "0" * 40  # any commit hash: the hub cache only needs refs/main to name it


def save_tiny_gpt2(folder):
    """A random 2-layer GPT-2 with a 27-token character tokenizer, saved as an HF model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{chr(ord("a") + i): 1 + i for i in range(26)}}
    char_level = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    char_level.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=char_level, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    # n_ctx: TransformerLens reads it as the real gpt2 config.json has it.
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=60, n_positions=32, n_ctx=32, bos_token_id=0, eos_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        hf_model = GPT2LMHeadModel(config).eval()
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return hf_model


def check_is_the_saved_model(model, hf_model):
    tokens = torch.randint(0, 60, (2, 8), generator=torch.Generator().manual_seed(0))
    hook = "blocks.1.hook_resid_post"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        expected = hf_model(tokens).logits.log_softmax(-1)
        # HookedTransformer folds LayerNorms and centres the unembedding: the logits move by a
        # constant per token, the next-token distribution does not.
        torch.testing.assert_close(model(tokens).log_softmax(-1), expected, atol=1e-5, rtol=1e-5)
    acts = harvest(model, tokens, hook)[hook]
    torch.testing.assert_close(acts, cache[hook].reshape(-1, 16), rtol=0, atol=0)
    assert model.to_tokens("abc").tolist() == [[0, 1, 2, 3]]  # the saved tokenizer, BOS first


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An HF hub cache holding the tiny GPT-2 as ``gpt2``, with every hub request refused."""
    import huggingface_hub.constants

    # huggingface_hub reads these variables at import, so the attributes are patched too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--gpt2"
    hf_model = save_tiny_gpt2(repo / "snapshots" / GPT2_REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(GPT2_REVISION)
    return hf_model


@pytest.mark.filterwarnings("ignore:HookedTransformer:DeprecationWarning")  # TransformerLens 3's nudge to the bridge
@pytest.mark.parametrize("loader", LOADERS)
def test_load_model_by_name_reads_the_hf_cache_offline(offline_hub, monkeypatch, loader):
    from switch_sae.activations import default_model

    if loader == "TransformerBridge":  # what TransformerLens 4 leaves load_model
        monkeypatch.setattr(default_model, "_hooked_transformer_class", lambda: None)
    model = load_model("gpt2")
    assert type(model).__name__ == loader
    check_is_the_saved_model(model, offline_hub)


def test_load_model_from_a_local_folder(tmp_path):
    hf_model = save_tiny_gpt2(tmp_path)
    model = load_model(str(tmp_path))
    assert type(model).__name__ == "TransformerBridge"  # HookedTransformer.from_pretrained takes names only
    check_is_the_saved_model(model, hf_model)
