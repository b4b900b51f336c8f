"""Tests of switch_sae.evals (metrics, patching, evaluate) on tiny TransformerLens models
(a ``HookedTransformer`` and a ``TransformerBridge``, see lm_models.py)."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

pytest.importorskip("transformer_lens")

from switch_sae import SwitchSAE, SwitchSAEConfig  # noqa: E402
from switch_sae.activations import harvest  # noqa: E402
from switch_sae.evals import EvalResult, ReconstructionMetrics, evaluate, evaluate_many, mean_activation  # noqa: E402
from switch_sae.evals.dead import dead_min_tokens, training_dead_latents, unseen_floor  # noqa: E402
from switch_sae.models import TopKSAE, TopKSAEConfig  # noqa: E402
from switch_sae.training import TrainConfig, Trainer  # noqa: E402
from switch_sae.evals.patching import keep_mask, splice_hook, token_kl  # noqa: E402
from switch_sae.models.base import ForwardOutput, SparseCode  # noqa: E402

from lm_models import D_HEAD, D_MODEL, D_VOCAB, N_HEADS  # noqa: E402

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture
def model(tiny_lm):
    """Each test below runs on every kind of TransformerLens model (see lm_models.py)."""
    return tiny_lm


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, D_VOCAB, (5, 12), generator=torch.Generator().manual_seed(1))


@dataclass
class StandInConfig:
    d_in: int
    hook_name: str = HOOK
    model_name: str = "tiny"


class StandInSAE(nn.Module):
    """x_hat = scale * x, with a dense code relu(x) (d_sae = d_in): identity at scale 1, zero at 0."""

    architecture = "stand_in"

    def __init__(self, d_in: int, scale: float) -> None:
        super().__init__()
        self.cfg, self.scale = StandInConfig(d_in), scale
        self.d_in = self.d_sae = d_in

    def forward(self, x):
        return ForwardOutput(x_hat=self.scale * x, code=None, acts=torch.relu(x))


def ce_from_hooks(model, tokens, hook_fn=None):
    """Mean next-token CE over all positions, computed by TransformerLens itself."""
    hooks = [] if hook_fn is None else [(HOOK, hook_fn)]
    return float(model.run_with_hooks(tokens, return_type="loss", fwd_hooks=hooks))


def test_identity_sae_recovers_all_the_loss(model, tokens):
    result = evaluate(StandInSAE(D_MODEL, 1.0), model, tokens, HOOK, batch_size=2, progress=False)
    assert result.loss_recovered_zero == pytest.approx(1.0, abs=1e-6)
    assert result.loss_recovered_mean == pytest.approx(1.0, abs=1e-6)
    assert result.ce_sae == pytest.approx(result.ce_clean, abs=1e-6)
    assert result.kl == pytest.approx(0.0, abs=1e-6) and result.kl_score == pytest.approx(1.0, abs=1e-6)
    assert result.mse == pytest.approx(0.0, abs=1e-10) and result.fve == pytest.approx(1.0)
    assert result.cosine == pytest.approx(1.0) and result.n_tokens == tokens.numel()
    assert abs(result.ce_zero - result.ce_clean) > 1e-3  # the hook matters: the ratio is defined


def test_zero_sae_recovers_none_of_it(model, tokens):
    result = evaluate(StandInSAE(D_MODEL, 0.0), model, tokens, HOOK, batch_size=3, progress=False)
    assert result.loss_recovered_zero == pytest.approx(0.0, abs=1e-6)
    assert result.ce_sae == pytest.approx(result.ce_zero, abs=1e-6)
    assert result.kl == pytest.approx(result.kl_zero, abs=1e-6)
    x = harvest(model, tokens, HOOK)[HOOK].double()
    assert result.mse == pytest.approx(float(x.pow(2).sum(-1).mean()), rel=1e-5)  # x_hat = 0
    assert result.fve == pytest.approx(float(1 - x.pow(2).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean()), rel=1e-5)


def test_switch_sae_matches_an_independent_run_with_hooks(model, tokens):
    torch.manual_seed(0)
    sae = SwitchSAE(SwitchSAEConfig(d_in=D_MODEL, n_experts=2, d_expert=8, k=3, hook_name=HOOK))
    result = evaluate(sae, model, tokens, batch_size=len(tokens), exclude_token_ids=(), progress=False)
    mean = mean_activation(model, tokens, HOOK)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        torch.testing.assert_close(mean, cache[HOOK].reshape(-1, D_MODEL).mean(0), rtol=1e-5, atol=1e-6)
        ce_clean = float(model(tokens, return_type="loss"))
        ce_sae = ce_from_hooks(model, tokens, lambda act, hook: sae(act).x_hat)
        ce_zero = ce_from_hooks(model, tokens, lambda act, hook: torch.zeros_like(act))
        ce_mean = ce_from_hooks(model, tokens, lambda act, hook: mean.expand_as(act))
        x = cache[HOOK].reshape(-1, D_MODEL)
        out = sae(x)
    assert result.ce_clean == pytest.approx(ce_clean, rel=1e-5)
    assert result.ce_sae == pytest.approx(ce_sae, rel=1e-5)
    assert result.ce_zero == pytest.approx(ce_zero, rel=1e-5)
    assert result.ce_mean == pytest.approx(ce_mean, rel=1e-5)
    assert result.loss_recovered_zero == pytest.approx((ce_zero - ce_sae) / (ce_zero - ce_clean), rel=1e-4)
    assert result.loss_recovered_mean == pytest.approx((ce_mean - ce_sae) / (ce_mean - ce_clean), rel=1e-4)
    assert result.mse == pytest.approx(float((x - out.x_hat).pow(2).sum(-1).mean()), rel=1e-5)
    assert result.l0 == pytest.approx(float((out.code.values != 0).sum(-1).float().mean()), rel=1e-6)
    assert len(result.expert_load) == 2 and sum(result.expert_load) == pytest.approx(1.0)
    assert result.router_entropy is not None and result.router_entropy > 0


def test_error_term_makes_the_splice_exact(model, tokens):
    torch.manual_seed(0)
    sae = SwitchSAE(SwitchSAEConfig(d_in=D_MODEL, n_experts=2, d_expert=8, k=2, hook_name=HOOK))
    result = evaluate(sae, model, tokens, use_error_term=True, progress=False)
    assert result.ce_sae == pytest.approx(result.ce_clean, abs=1e-5)
    assert result.kl == pytest.approx(0.0, abs=1e-6)
    assert result.mse > 0  # the reconstruction metrics still score x_hat, not x


def test_excluded_tokens_are_left_unpatched_and_unscored(model, tokens):
    special = int(tokens[0, 0])
    keep = keep_mask(tokens, [special])
    assert not keep[0, 0] and keep.sum() == (tokens != special).sum()
    act = torch.randn(*tokens.shape, D_MODEL)
    patched = splice_hook(torch.zeros_like, keep)(act)
    assert torch.equal(patched[~keep], act[~keep]) and patched[keep].abs().sum() == 0
    result = evaluate(StandInSAE(D_MODEL, 0.0), model, tokens, exclude_token_ids=[special], progress=False)
    assert result.n_tokens == int(keep.sum())
    assert result.extra["ce_tokens"] == int(keep[:, 1:].sum())


def test_attention_hook_z_is_spliced_over_flattened_heads(model, tokens):
    sae = StandInSAE(N_HEADS * D_HEAD, 1.0)
    result = evaluate(sae, model, tokens, "blocks.0.attn.hook_z", progress=False)
    assert result.loss_recovered_zero == pytest.approx(1.0, abs=1e-6)
    assert result.ce_zero != pytest.approx(result.ce_clean)


def test_reconstruction_metrics_by_hand():
    torch.manual_seed(0)
    x = torch.randn(30, 4) + 2.0
    x_hat = x + 0.3 * torch.randn(30, 4)
    values = torch.tensor([[1.0, 0.0]] * 30)  # one inactive slot per token
    indices = torch.tensor([[0, 1]] * 15 + [[2, 1]] * 15)
    acc = ReconstructionMetrics(4, 5, dense_threshold=0.4)
    for rows in (slice(0, 15), slice(15, 30)):  # latent 2 fires only in the second batch
        code = SparseCode(values[rows], indices[rows])
        acc.update(x[rows], ForwardOutput(x_hat=x_hat[rows], code=code, acts=None))
    r = acc.result()
    err = (x - x_hat).pow(2).sum(-1)
    total_variance = (x - x.mean(0)).pow(2).sum(-1).mean()
    assert r.mse == pytest.approx(float(err.mean()), rel=1e-6)
    assert r.fve == pytest.approx(float(1 - err.mean() / total_variance), rel=1e-6)
    saelens_total = x.pow(2).sum(-1).mean() - x.pow(2).mean() ** 2
    assert r.explained_variance_saelens == pytest.approx(float(1 - err.mean() / saelens_total), rel=1e-6)
    assert r.explained_variance_saelens != pytest.approx(r.fve, rel=1e-3)
    assert r.l0 == 1.0  # zeros in the code are not active latents
    assert r.n_unseen == 3 and r.unseen_fraction == pytest.approx(3 / 5)  # 1 (only zeros), 3, 4; 2 fired late
    assert r.unseen_floor == pytest.approx((1 - 1 / 5) ** 30)  # L0 = 1 of 5 latents, 30 tokens
    assert r.dense_fraction == pytest.approx(2 / 5)  # latents 0 and 2 fire on half the tokens
    assert r.cosine == pytest.approx(float(torch.cosine_similarity(x, x_hat).mean()), rel=1e-6)


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    logits = torch.randn(2, 3, 7)
    assert token_kl(logits, logits).abs().max() < 1e-6
    assert (token_kl(logits, logits.flip(-1)) > 0).all()


def test_result_prints_and_saves_json(model, tokens, tmp_path):
    result = evaluate(StandInSAE(D_MODEL, 0.5), model, tokens, progress=False)
    text = str(result)
    for name in ("mse", "fve", "l0", "unseen_fraction", "unseen_floor", "dead_fraction", "ce_clean", "ce_sae", "ce_zero", "ce_mean",
                 "loss_recovered_zero", "loss_recovered_mean", "kl", "explained_variance_saelens"):
        assert name in text
    saved = json.loads(result.save(tmp_path / "eval.json").read_text())
    assert saved["loss_recovered_zero"] == pytest.approx(result.loss_recovered_zero)
    assert EvalResult(**saved).ce_sae == pytest.approx(result.ce_sae)


def test_evaluate_rejects_bad_arguments(model, tokens):
    sae = StandInSAE(D_MODEL, 1.0)
    with pytest.raises(ValueError, match="not hook points"):
        evaluate(sae, model, tokens, "blocks.9.hook_nothing", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(sae, model, tokens, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="tokens"):
        evaluate(sae, model, tokens[:, :1], progress=False)


def test_evaluate_many_equals_evaluate_one_by_one(model, tokens):
    torch.manual_seed(0)
    saes = {
        "switch": SwitchSAE(SwitchSAEConfig(d_in=D_MODEL, n_experts=2, d_expert=8, k=3, hook_name=HOOK)),
        "topk": TopKSAE(TopKSAEConfig(d_in=D_MODEL, d_sae=12, k=2, hook_name=HOOK)),
        "half": StandInSAE(D_MODEL, 0.5),
    }
    together = evaluate_many(saes, model, tokens, batch_size=2, progress=False)
    assert list(together) == list(saes)
    for name, sae in saes.items():
        alone = evaluate(sae, model, tokens, batch_size=2, progress=False).to_dict()
        shared = together[name].to_dict()
        assert shared.keys() == alone.keys()
        for key, value in alone.items():
            if isinstance(value, float):
                assert shared[key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), (name, key)
            elif isinstance(value, list):
                assert shared[key] == pytest.approx(value, rel=1e-6), (name, key)
            else:
                assert shared[key] == value, (name, key)
    assert together["switch"].ce_sae != pytest.approx(together["topk"].ce_sae)  # each SAE had its own splice


def test_evaluate_many_counts_model_passes(model, tokens, monkeypatch):
    evaluate_module = importlib.import_module("switch_sae.evals.evaluate")  # the package exports evaluate()
    calls = []
    real = evaluate_module.run_patched
    monkeypatch.setattr(evaluate_module, "run_patched", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    saes = {f"s{i}": StandInSAE(D_MODEL, 0.1 * i) for i in range(3)}
    evaluate_many(saes, model, tokens, HOOK, batch_size=len(tokens), progress=False)
    assert len(calls) == 2 + 3  # zero and mean ablation once, then one splice per SAE


def test_evaluate_many_rejects_bad_arguments(model, tokens):
    with pytest.raises(ValueError, match="saes is empty"):
        evaluate_many({}, model, tokens, HOOK, progress=False)
    other = StandInSAE(D_MODEL, 1.0)
    other.cfg = StandInConfig(D_MODEL, hook_name="blocks.0.hook_resid_post")
    with pytest.raises(ValueError, match="same cfg.hook_name"):
        evaluate_many({"a": StandInSAE(D_MODEL, 1.0), "b": other}, model, tokens, progress=False)
    with pytest.raises(ValueError, match="not in saes"):
        evaluate_many({"a": other}, model, tokens, HOOK, run_dirs={"b": "x"}, progress=False)


def test_unseen_is_called_dead_only_from_enough_tokens(model, tokens):
    assert unseen_floor(32, 32768, 1024) == pytest.approx((1 - 32 / 32768) ** 1024)
    assert 0.36 < unseen_floor(32, 32768, 1024) < 0.38  # a healthy SAE "misses" 37% on 1024 tokens
    assert dead_min_tokens(32, 32768) == 10 * 1024 and dead_min_tokens(0.0, 8) is None
    # The stand-in fires relu(x): about half its D_MODEL latents per token, so 60 tokens are plenty.
    enough = evaluate(StandInSAE(D_MODEL, 1.0), model, tokens, HOOK, progress=False)
    assert enough.n_tokens >= enough.dead_window_tokens == dead_min_tokens(enough.l0, D_MODEL)
    assert enough.dead_source == "eval" and enough.n_dead == enough.n_unseen
    torch.manual_seed(0)
    wide = TopKSAE(TopKSAEConfig(d_in=D_MODEL, d_sae=256, k=2, hook_name=HOOK))  # needs 1280 tokens
    few = evaluate(wide, model, tokens, progress=False)
    assert few.dead_fraction is None and few.n_dead is None and few.dead_source is None
    assert few.unseen_fraction > 0 and few.unseen_floor == pytest.approx(unseen_floor(few.l0, 256, few.n_tokens))
    assert "too few tokens" in few.table()


def test_the_training_tracker_supplies_the_dead_count(model, tokens, tmp_path):
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=D_MODEL, d_sae=64, k=2, hook_name=HOOK))  # window 320 tokens
    assert training_dead_latents(tmp_path, 2.0) is None  # no checkpoint
    trainer = Trainer(sae, TrainConfig(total_steps=6, run_dir=str(tmp_path), progress=False))
    trainer.fit(torch.randn(6, 64, D_MODEL))  # 384 training tokens
    since_fired = trainer.dead.tokens_since_fired.clone()
    result = evaluate(sae, model, tokens, run_dir=tmp_path, progress=False)
    assert result.n_tokens < dead_min_tokens(result.l0, 64)  # the eval alone cannot tell
    assert result.dead_source == "training" and result.dead_window_tokens == dead_min_tokens(result.l0, 64)
    assert result.n_dead == int((since_fired >= result.dead_window_tokens).sum())
    assert training_dead_latents(tmp_path, 0.5) is None  # a 1280-token window is longer than the run
