"""Tests of the feature dashboard's data: streaming top-k and per-feature records against
brute force, the Switch routing counts, logit effects, and the written site (every
architecture; Switch panels only for Switch SAEs). The browser test is test_dashboard_browser.py."""

from __future__ import annotations

import json
import re

import pytest
import torch

from switch_sae import SwitchSAE, SwitchSAEConfig
from switch_sae.activations import harvest
from switch_sae.dashboard import DashboardConfig, build_dashboard
from switch_sae.dashboard.effects import logit_effects
from switch_sae.dashboard.gather import gather
from switch_sae.dashboard.streaming import HIST_EDGES, N_BINS, FeatureRecorder, StreamingTopK
from switch_sae.models import ReLUSAE, ReLUSAEConfig, TopKSAE, TopKSAEConfig

from lm_models import D_MODEL, D_VOCAB

HOOK = "blocks.1.hook_resid_post"


def random_firings(generator, n_tokens, d_sae, per_token):
    tokens = torch.arange(n_tokens).repeat_interleave(per_token)
    features = torch.randint(0, d_sae, (n_tokens * per_token,), generator=generator)
    values = torch.rand(n_tokens * per_token, generator=generator) * 10 + 1e-3
    return tokens, features, values


def test_streaming_topk_matches_a_full_sort():
    generator = torch.Generator().manual_seed(0)
    d_sae, n = 7, 4
    top = StreamingTopK(d_sae, n)
    seen = []
    for batch in range(5):  # several merges; feature 6 never fires; some features repeat within a batch
        tokens, features, values = random_firings(generator, 6, d_sae - 1, 3)
        top.update(features, values, tokens + 100 * batch, values)
        seen.append((features, values, tokens + 100 * batch))
    features, values, tokens = (torch.cat(t) for t in zip(*seen))
    for f in range(d_sae):
        mine = features == f
        expected = values[mine].sort(descending=True).values[:n]
        kept_tokens, kept_values = top.examples(f)
        assert torch.equal(kept_values, expected)
        for t, v in zip(kept_tokens, kept_values):  # each kept example is a real occurrence
            assert ((tokens == t) & (features == f) & (values == v)).any()
    assert top.examples(d_sae - 1)[0].numel() == 0


def test_recorder_counts_histograms_and_sample():
    generator = torch.Generator().manual_seed(1)
    d_sae = 5
    rec = FeatureRecorder(d_sae, n_top=3, n_sample=4, seed=0)
    all_f, all_v, all_t = [], [], []
    for batch in range(3):
        tokens, features, values = random_firings(generator, 10, d_sae, 2)
        rec.update(10, tokens + 10 * batch, features, values)
        all_f.append(features), all_v.append(values), all_t.append(tokens + 10 * batch)
    features, values, tokens = torch.cat(all_f), torch.cat(all_v), torch.cat(all_t)
    assert rec.n_tokens == 30
    for f in range(d_sae):
        mine = values[features == f]
        assert rec.fires[f] == mine.numel()
        assert rec.frequency[f] == pytest.approx(mine.numel() / 30)
        assert rec.mean_activation[f] == pytest.approx(float(mine.double().mean()))
        expected = torch.bincount(torch.bucketize(mine.double(), HIST_EDGES), minlength=N_BINS)
        assert torch.equal(rec.histograms()[f], expected)
        sample_tokens, sample_values = rec.sample.examples(f)
        assert sample_values.numel() == min(4, mine.numel())
        for t, v in zip(sample_tokens, sample_values):
            assert ((tokens == t) & (features == f) & (values == v)).any()


def tiny_switch(seed=0, n_experts=4, d_expert=8, k=3):
    torch.manual_seed(seed)
    return SwitchSAE(SwitchSAEConfig(d_in=D_MODEL, n_experts=n_experts, d_expert=d_expert, k=k))


def contexts(n=6, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, D_VOCAB, (n, length), generator=generator)


def test_gather_matches_dense_activations(tiny_lm):
    sae = tiny_switch()
    tokens = contexts()
    activity = gather(sae, tiny_lm, tokens, HOOK, n_top=3, n_sample=5, harvest_batch=4, progress=False)
    x = harvest(tiny_lm, tokens, HOOK, drop_first=True)[HOOK]  # [n_tokens, d_in]
    with torch.no_grad():
        dense = sae.encode_dense(x)  # [n_tokens, d_sae]: fine at this size, the reference
    rec = activity.recorder
    assert rec.n_tokens == x.shape[0] == tokens.shape[0] * (tokens.shape[1] - 1)
    assert torch.equal(rec.fires, (dense > 0).sum(0))
    for f in range(sae.d_sae):
        column = dense[:, f]
        expected = column[column > 0].sort(descending=True).values[:3]
        assert torch.allclose(rec.top.examples(f)[1], expected, rtol=1e-5)
    # The firing index returns every token's activation, zero where the feature did not fire.
    rows = torch.arange(x.shape[0]).repeat(sae.d_sae)
    features = torch.arange(sae.d_sae).repeat_interleave(x.shape[0])
    looked_up = activity.firings.lookup(features, rows).view(sae.d_sae, -1).T
    assert torch.allclose(looked_up, dense.half().float(), rtol=1e-3, atol=1e-4)


def test_routing_counts_match_forcing_each_expert(tiny_lm):
    sae = tiny_switch(seed=3)
    tokens = contexts(seed=3)
    activity = gather(sae, tiny_lm, tokens, HOOK, n_top=2, n_sample=2, progress=False)
    x = harvest(tiny_lm, tokens, HOOK, drop_first=True)[HOOK]
    cfg = sae.cfg
    with torch.no_grad():
        _, _, chosen = sae.route(x)  # [n_tokens, 1]
        pre = torch.einsum("emd,td->tem", sae.W_enc, x - sae.b_dec)  # [n_tokens, n_experts, d_expert]
    top = pre.topk(cfg.k, dim=-1)
    would = torch.zeros(x.shape[0], cfg.n_experts, cfg.d_expert, dtype=torch.bool)
    would.scatter_(-1, top.indices, top.values > 0)
    would = would.view(x.shape[0], -1)  # [n_tokens, d_sae]
    owner = torch.arange(sae.d_sae) // cfg.d_expert
    elsewhere = would & (chosen[:, :1] != owner.unsqueeze(0))
    routing = activity.routing
    assert torch.equal(routing.would_fire, would.sum(0))
    assert torch.equal(routing.elsewhere, elsewhere.sum(0))
    by_expert = torch.stack([(would & (chosen[:, :1] == e)).sum(0) for e in range(cfg.n_experts)], dim=1)
    assert torch.equal(routing.by_expert, by_expert)
    assert sum(routing.stats.load) == pytest.approx(1.0)
    # A feature only fires where its expert was chosen: firing counts = would-fire minus elsewhere.
    assert torch.equal(activity.recorder.fires, routing.would_fire - routing.elsewhere)


def test_logit_effects_through_the_final_norm(tiny_lm):
    sae = tiny_switch()
    features = torch.tensor([0, 5, 17])
    effects = logit_effects(tiny_lm, sae.W_dec_flat.detach(), features, 4)
    W = sae.W_dec_flat.detach()[features]
    W = W - W.mean(dim=-1, keepdim=True)  # the tiny models use LayerNorm
    weight = getattr(tiny_lm.ln_final, "w", None)
    if weight is None:
        weight = tiny_lm.ln_final.original_component.weight
    logits = (W * weight.detach()) @ tiny_lm.W_U.detach()
    assert torch.equal(effects.top_ids, logits.topk(4).indices)
    assert torch.allclose(effects.bottom_values, logits.topk(4, largest=False).values, rtol=1e-5, atol=1e-6)
    # A hook that is not the residual stream has no logit effect.
    assert logit_effects(tiny_lm, torch.randn(3, D_MODEL + 1), torch.arange(3), 4) is None


def read_data(path):
    text = path.read_text()
    match = re.fullmatch(r'DASH\.receive\("(\w+)","([\w/]+)",(.*)\);\n', text, flags=re.S)
    assert match, f"{path} is not a data script"
    return json.loads(match.group(3))


@pytest.mark.parametrize("architecture", ["switch", "topk", "relu"])
def test_site_for_every_architecture(architecture, tiny_lm, tmp_path):
    torch.manual_seed(0)
    sae = {
        "switch": lambda: tiny_switch(n_experts=2, d_expert=150),
        "topk": lambda: TopKSAE(TopKSAEConfig(d_in=D_MODEL, d_sae=300, k=3)),
        "relu": lambda: ReLUSAE(ReLUSAEConfig(d_in=D_MODEL, d_sae=300)),
    }[architecture]()
    cfg = DashboardConfig(top_examples=3, sample_size=10, band_examples=1, left=2, right=1, logit_tokens=4, neighbours=3)
    index = build_dashboard(sae, tiny_lm, contexts(), HOOK, tmp_path / "site", cfg, progress=False)
    site = index.parent
    assert index.name == "index.html" and (site / "feature.html").is_file()
    assert (site / "assets" / "plotly.min.js").stat().st_size > 1_000_000  # bundled once, offline
    assert "cdn" not in index.read_text().lower()
    meta = read_data(site / "data" / "meta.js")
    assert meta["d_sae"] == 300 and meta["switch"] == (architecture == "switch")
    rows = read_data(site / "data" / "rows" / "0000.js")
    assert [r[0] for r in rows] == list(range(300))
    records = [r for c in sorted((site / "data" / "features").glob("*.js")) for r in read_data(c)]
    assert [r["id"] for r in records] == list(range(300))
    tokens = read_data(site / "data" / "tokens.js")
    fired = [r for r in records if r["fires"]]
    assert fired, "some feature must fire on the tokens"
    for r in fired:
        assert len(r["top"]) == min(3, r["fires"]) and len(r["logits_top"]) == 4 and len(r["neighbours"]) == 3
        start, token, value, percents = r["top"][0]
        assert value == r["max"] and percents[token - start] == 100  # the top token is the maximum
        assert start <= token < start + len(percents) <= start + 4
        assert 0 < len(r["bands"]) <= 5 and all(b["low"] <= b["high"] for b in r["bands"])
        assert all(str(tokens["ids"][t]) in tokens["vocab"] for t in range(start, start + len(percents)))
        assert sum(r["histogram"][1:]) == r["fires"]
    assert all("top" not in r and "logits_top" not in r for r in records if not r["fires"])
    if architecture == "switch":
        assert {r["expert"] for r in records} == {0, 1} and all("routing" in r for r in records)
        assert (site / "experts.html").is_file() and (site / "experts" / "expert_1.html").is_file()
    else:
        assert not (site / "experts.html").exists() and all("routing" not in r and "expert" not in r for r in records)


def test_dashboard_command_on_the_default_model(tmp_path, patched_lm, capsys):
    from switch_sae import cli

    torch.manual_seed(0)
    SwitchSAE(SwitchSAEConfig(d_in=576, n_experts=2, d_expert=64, k=4, hook_name="blocks.9.hook_resid_post")).save(tmp_path / "run" / "sae")
    out = tmp_path / "site"
    argv = ["dashboard", str(tmp_path / "run"), "--out", str(out), "--tokens", "120", "--context-size", "31",
            "--logit-tokens", "3", "--no-progress"]
    assert cli.main(argv) == 0
    assert f"wrote {out / 'index.html'}" in capsys.readouterr().out
    meta = read_data(out / "data" / "meta.js")
    assert meta["n_tokens"] == 120 and meta["hook_name"] == "blocks.9.hook_resid_post"
    records = [r for c in sorted((out / "data" / "features").glob("*.js")) for r in read_data(c)]
    vocab = read_data(out / "data" / "tokens.js")["vocab"]
    fired = [r for r in records if r["fires"]]
    assert fired and all(len(r["logits_top"]) == 3 for r in fired)
    assert all(isinstance(vocab[str(i)], str) for r in fired for i, _ in r["logits_top"])  # real token text
    assert cli.main(["dashboard", str(tmp_path / "missing"), "--no-progress"]) == cli.EXIT_USAGE
    assert "is not a folder" in capsys.readouterr().err
