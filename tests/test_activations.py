"""Tests of switch_sae.activations on tiny TransformerLens models built from a config
(a ``HookedTransformer`` and a ``TransformerBridge``, see lm_models.py)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformer_lens")
datasets = pytest.importorskip("datasets")

from switch_sae.activations import (  # noqa: E402
    ActivationCache,
    CacheSpec,
    ShufflingBuffer,
    batched,
    build_cache,
    harvest,
    hook_d_in,
    hook_layer,
    iter_contexts,
    iter_documents,
    load_tokens,
    stop_layer,
)
from switch_sae.activations.cache import MANIFEST  # noqa: E402

from lm_models import D_HEAD, D_MODEL, D_VOCAB, N_CTX, N_HEADS  # noqa: E402


@pytest.fixture
def model(tiny_lm):
    """Each test below runs on every kind of TransformerLens model (see lm_models.py)."""
    return tiny_lm


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, D_VOCAB, (6, N_CTX), generator=torch.Generator().manual_seed(0))


class CharTokenizer:
    """Stand-in HF tokenizer: one token per character (ids 3..), BOS 1, EOS 2."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=False, verbose=False):
        ids = [3 + (ord(c) % 40) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


# -- harvest -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hook", ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.2.hook_mlp_out", "blocks.1.attn.hook_z"]
)
def test_harvest_equals_the_models_own_cache(model, tokens, hook):
    with torch.no_grad():
        _, full = model.run_with_cache(tokens)
    expected = full[hook]
    if expected.dim() == 4:  # [batch, pos, n_heads, d_head] -> heads flattened
        expected = expected.reshape(*expected.shape[:2], -1)
    got = harvest(model, tokens, hook)[hook]
    assert got.shape == (tokens.numel(), expected.shape[-1])
    torch.testing.assert_close(got, expected.reshape(-1, expected.shape[-1]), rtol=0, atol=0)
    assert not got.requires_grad
    dropped = harvest(model, tokens, hook, drop_first=True, flatten=False)[hook]
    torch.testing.assert_close(dropped, expected[:, 1:], rtol=0, atol=0)


def test_hook_z_width_is_heads_times_d_head(model):
    assert hook_d_in(model, "blocks.0.attn.hook_z") == N_HEADS * D_HEAD
    assert hook_d_in(model, "blocks.0.hook_resid_post") == D_MODEL


def test_several_hooks_share_one_early_stopped_pass(model, tokens, monkeypatch):
    calls = []
    original = model.run_with_cache

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "run_with_cache", spy)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    out = harvest(model, tokens, hooks)
    assert len(calls) == 1
    assert calls[0]["stop_at_layer"] == 2
    assert calls[0]["names_filter"] == hooks
    assert set(out) == set(hooks)


def test_stop_at_layer_skips_the_later_blocks(model, tokens):
    ran = []
    handles = [block.register_forward_hook(lambda m, i, o, n=n: ran.append(n)) for n, block in enumerate(model.blocks)]
    try:
        harvest(model, tokens, "blocks.0.hook_resid_post")
    finally:
        for handle in handles:
            handle.remove()
    assert ran == [0]


def test_hook_layer_and_stop_layer():
    assert hook_layer("blocks.8.hook_resid_pre") == 8
    assert hook_layer("blocks.12.attn.hook_z") == 12
    assert hook_layer("ln_final.hook_normalized") is None
    assert stop_layer(["blocks.3.hook_resid_post", "blocks.8.hook_resid_pre"]) == 9
    assert stop_layer(["blocks.3.hook_resid_post", "ln_final.hook_normalized"]) is None


def test_harvest_rejects_bad_input(model, tokens):
    with pytest.raises(ValueError, match="tokens"):
        harvest(model, tokens.float(), "blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="not hook points"):
        harvest(model, tokens, "blocks.0.hook_nonexistent")
    with pytest.raises(ValueError, match="duplicates"):
        harvest(model, tokens, ["blocks.0.hook_resid_post"] * 2)


# -- text ----------------------------------------------------------------------------------


def test_contexts_pack_documents_with_bos_and_separators():
    docs = [[10, 11, 12], [13, 14], [15, 16, 17, 18, 19]]
    got = list(iter_contexts(docs, context_size=4, prepend_bos=True, bos_token_id=1, separator_token_id=2))
    # stream 10 11 12 2 13 14 2 15 16 17 18 19 2, cut into bodies of 3, BOS in front
    assert [c.tolist() for c in got] == [[1, 10, 11, 12], [1, 2, 13, 14], [1, 2, 15, 16], [1, 17, 18, 19]]
    raw = list(iter_contexts(docs, context_size=4, prepend_bos=False, separator_token_id=2))
    assert [c.tolist() for c in raw] == [[10, 11, 12, 2], [13, 14, 2, 15], [16, 17, 18, 19]]


def test_text_sources_give_the_same_contexts(tmp_path):
    texts = ["The cat sat on the mat.", "A second, longer document about dogs and birds."]
    (tmp_path / "a.txt").write_text(texts[0])
    (tmp_path / "b.txt").write_text(texts[1])
    tok = CharTokenizer()
    expected = load_tokens(texts, tok, context_size=8)
    assert expected[:, 0].eq(tok.bos_token_id).all()
    assert torch.equal(load_tokens(tmp_path, tok, context_size=8), expected)
    assert torch.equal(load_tokens([tmp_path / "a.txt", tmp_path / "b.txt"], tok, context_size=8), expected)
    table = datasets.Dataset.from_dict({"text": texts})
    assert torch.equal(load_tokens(table, tok, context_size=8), expected)
    streamed = table.to_iterable_dataset()
    assert torch.equal(load_tokens(streamed, tok, context_size=8), expected)
    # a dataset name goes through datasets.load_dataset (here its local "text" builder)
    from_hub_api = load_tokens("text", tok, context_size=8, data_files=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")],
                               streaming=False, sample_by="document")
    assert torch.equal(from_hub_api, expected)
    # pre-tokenised column: used as is
    pretok = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]]})
    assert list(iter_documents(pretok)) == [[5, 6, 7], [8, 9]]


def test_load_tokens_counts_and_errors():
    tok = CharTokenizer()
    texts = ["abcdefghij" * 5]
    assert load_tokens(texts, tok, n_contexts=3, context_size=8).shape == (3, 8)
    with pytest.raises(ValueError, match="only"):
        load_tokens(texts, tok, n_contexts=100, context_size=8)
    with pytest.raises(ValueError, match="context_size"):
        load_tokens(texts, tok, context_size=1)
    with pytest.raises(ValueError, match="tokenizer"):
        list(iter_contexts(["text"], None, 4, bos_token_id=1))
    with pytest.raises(FileNotFoundError):
        list(iter_documents("./no/such/file.txt"))
    assert [b.shape[0] for b in batched(iter(torch.zeros(7, 4, dtype=torch.long)), 3)] == [3, 3, 1]


# -- buffer --------------------------------------------------------------------------------


def numbered_chunks(sizes, d_in=3):
    """Chunks whose rows carry their global row number in every column."""
    start, chunks = 0, []
    for size in sizes:
        chunks.append(torch.arange(start, start + size, dtype=torch.float32).unsqueeze(1).repeat(1, d_in))
        start += size
    return chunks, start


@pytest.mark.parametrize("capacity,batch_size", [(20, 4), (50, 8), (16, 8), (1000, 7)])
def test_buffer_yields_every_token_exactly_once_per_pass(capacity, batch_size):
    chunks, n = numbered_chunks([7, 13, 1, 30, 5, 9, 22])
    buffer = ShufflingBuffer(chunks, capacity, batch_size, seed=1)
    orders = []
    for _ in range(2):
        batches = list(buffer)
        assert all(b.shape == (batch_size, 3) for b in batches[:-1])
        ids = torch.cat(batches)[:, 0].long()
        assert sorted(ids.tolist()) == list(range(n))
        orders.append(ids)
    assert not torch.equal(orders[0], torch.arange(n))  # shuffled
    assert not torch.equal(orders[0], orders[1])  # a new order each pass


def test_buffer_mixes_across_chunks_and_drop_last():
    chunks, n = numbered_chunks([40] * 5)
    first = next(iter(ShufflingBuffer(chunks, 80, 10, seed=0)))[:, 0]
    assert (first >= 40).any() and (first < 40).any()  # drawn from a pool of two chunks
    batches = list(ShufflingBuffer(chunks, 80, 30, drop_last=True))
    assert all(b.shape[0] == 30 for b in batches) and len(batches) == n // 30
    with pytest.raises(ValueError, match="capacity"):
        ShufflingBuffer(chunks, 10, 8)


# -- cache ---------------------------------------------------------------------------------


HOOK = "blocks.1.hook_resid_post"


def spec_for(model, **overrides):
    fields = dict(model_name="tiny", hook_name=HOOK, d_in=D_MODEL, context_size=N_CTX)
    return CacheSpec(**{**fields, **overrides})


def test_cache_round_trips(model, tokens, tmp_path):
    expected = harvest(model, tokens, HOOK)[HOOK]
    cache = build_cache(model, batched(iter(tokens), 2), tmp_path / "c", spec_for(model), shard_tokens=40, progress=False)
    assert len(cache) == tokens.numel() and cache.d_in == D_MODEL
    assert len(cache.manifest.shards) > 1
    torch.testing.assert_close(torch.cat(list(cache)), expected, rtol=0, atol=0)
    torch.testing.assert_close(cache[5:70], expected[5:70], rtol=0, atol=0)
    torch.testing.assert_close(cache[17], expected[17], rtol=0, atol=0)
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert manifest["complete"] and manifest["n_tokens"] == tokens.numel()
    assert manifest["spec"]["hook_name"] == HOOK and all(len(s["sha256"]) == 64 for s in manifest["shards"])
    reopened = ActivationCache(tmp_path / "c", expect=spec_for(model), verify=True)
    torch.testing.assert_close(torch.cat(list(reopened)), expected, rtol=0, atol=0)
    # the cache feeds the shuffling buffer directly
    assert sum(b.shape[0] for b in ShufflingBuffer(reopened, 64, 16)) == tokens.numel()


def test_cache_bfloat16_and_drop_first(model, tokens, tmp_path):
    spec = spec_for(model, dtype="bfloat16", drop_first=True)
    cache = build_cache(model, batched(iter(tokens), 3), tmp_path, spec, progress=False)
    expected = harvest(model, tokens, HOOK, drop_first=True)[HOOK].to(torch.bfloat16)
    got = torch.cat(list(cache))
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)


def test_cache_resumes_after_interruption(model, tokens, tmp_path, monkeypatch):
    spec = spec_for(model)
    expected = harvest(model, tokens, HOOK)[HOOK]

    def interrupted():
        yield from batched(iter(tokens[:4]), 2)
        raise KeyboardInterrupt  # killed mid-harvest

    with pytest.raises(KeyboardInterrupt):
        build_cache(model, interrupted(), tmp_path, spec, shard_tokens=1, progress=False)
    partial = json.loads((tmp_path / MANIFEST).read_text())
    assert not partial["complete"] and partial["n_contexts"] == 4
    seen = []
    original = model.run_with_cache
    monkeypatch.setattr(model, "run_with_cache", lambda toks, **kw: (seen.append(toks.shape[0]), original(toks, **kw))[1])
    cache = build_cache(model, batched(iter(tokens), 2), tmp_path, spec, shard_tokens=1, progress=False)
    assert sum(seen) == tokens.shape[0] - 4  # only the missing contexts were harvested
    torch.testing.assert_close(torch.cat(list(cache)), expected, rtol=0, atol=0)
    seen.clear()
    build_cache(model, batched(iter(tokens), 2), tmp_path, spec, progress=False)  # complete: nothing to do
    assert seen == []


def test_cache_stops_at_n_tokens(model, tokens, tmp_path):
    cache = build_cache(model, batched(iter(tokens), 1), tmp_path, spec_for(model), n_tokens=3 * N_CTX, progress=False)
    assert len(cache) == 3 * N_CTX


def test_cache_refuses_a_mismatch_and_detects_corruption(model, tokens, tmp_path):
    build_cache(model, batched(iter(tokens), 2), tmp_path, spec_for(model), progress=False)
    with pytest.raises(ValueError, match="hook_name"):
        ActivationCache(tmp_path, expect=spec_for(model, hook_name="blocks.0.hook_resid_post"))
    with pytest.raises(ValueError, match="model_name.*dtype|dtype"):
        build_cache(model, batched(iter(tokens), 2), tmp_path, spec_for(model, model_name="other", dtype="float16"))
    shard = tmp_path / json.loads((tmp_path / MANIFEST).read_text())["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{shard}.* is corrupt"):
        ActivationCache(tmp_path, verify=True)
    with pytest.raises(FileNotFoundError, match="manifest"):
        ActivationCache(tmp_path / "nothing")
    with pytest.raises(ValueError, match="d_in"):
        CacheSpec(model_name="m", hook_name=HOOK, d_in=0)
