"""The blocked parameter update (training/update.py) against the op-by-op sequence it
replaces: projection of the decoder gradient, clipping, the optimiser step, renormalisation."""

from __future__ import annotations

import pytest
import torch

from switch_sae.models import SwitchSAE, SwitchSAEConfig, TopKSAE, TopKSAEConfig
from switch_sae.training import TrainConfig, Trainer, trainer as trainer_module, update
from switch_sae.training.optim import make_optimizer


MODELS = {
    "switch": lambda: SwitchSAE(SwitchSAEConfig(d_in=16, n_experts=4, d_expert=25, k=4)),
    "topk": lambda: TopKSAE(TopKSAEConfig(d_in=16, d_sae=100, k=4)),
}


def twins(make, optimizer_name):
    torch.manual_seed(0)
    models = [make(), make()]
    models[1].load_state_dict(models[0].state_dict())
    cfg = TrainConfig(total_steps=10, optimizer=optimizer_name)
    return models, [make_optimizer(m.parameters(), cfg, lr=3e-3) for m in models]


def assert_same(a, b, what):
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), f"{what}: max diff {(a - b).abs().max():.3g}"


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("optimizer_name", ["adam", "signsgd"])
@pytest.mark.parametrize("max_norm", [0.05, float("inf")])  # clipping every step, never
def test_blocked_update_equals_the_op_by_op_sequence(monkeypatch, name, optimizer_name, max_norm):
    monkeypatch.setattr(update, "DECODER_BLOCK_BYTES", 7 * 16 * 4)  # 7-row blocks: 15 of them, the last short
    (fused, plain), (opt_fused, opt_plain) = twins(MODELS[name], optimizer_name)
    assert len(update.row_blocks(fused.W_dec_flat)) == 15
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(64, 16, generator=g) * 3
        norms = []
        for model, opt, fn in ((fused, opt_fused, update.update_parameters_), (plain, opt_plain, update.update_op_by_op_)):
            opt.zero_grad(set_to_none=True)
            model(x).x_hat.sub(x).square().sum().backward()
            norms.append(fn(model, opt, max_norm))
        assert_same(norms[0], norms[1], f"grad norm at step {step}")
        if max_norm < 1:
            assert norms[0] > max_norm  # the case does clip
        for (param, a), b in zip(fused.named_parameters(), plain.parameters()):
            assert_same(a, b, f"{param} after step {step}")
            if a.grad is not None:
                assert_same(a.grad, b.grad, f"grad of {param} after step {step}")
    assert torch.allclose(fused.W_dec_flat.norm(dim=-1), torch.ones(fused.d_sae))
    state_fused, state_plain = opt_fused.state_dict(), opt_plain.state_dict()
    assert state_fused["param_groups"] == state_plain["param_groups"]
    assert state_fused["state"].keys() == state_plain["state"].keys()  # a checkpoint does not tell them apart
    for key, entry in state_plain["state"].items():
        for field, value in entry.items():
            assert state_fused["state"][key][field].dtype == value.dtype
            assert_same(state_fused["state"][key][field], value, f"optimiser state {key}.{field}")


def test_blocks_cover_every_row_once():
    W = torch.zeros(1000, 64)
    blocks = update.row_blocks(W)
    covered = torch.cat([torch.arange(1000)[b] for b in blocks])
    assert torch.equal(covered, torch.arange(1000))
    assert all(b.stop - b.start == update.DECODER_BLOCK_BYTES // (64 * 4) for b in blocks[:-1])


def test_trainer_steps_equal_with_the_op_by_op_update(monkeypatch):
    def train(update_fn):
        monkeypatch.setattr(trainer_module, "update_parameters_", update_fn)
        torch.manual_seed(0)
        model = MODELS["switch"]()
        trainer = Trainer(model, TrainConfig(total_steps=5, grad_clip=0.5, progress=False))
        g = torch.Generator().manual_seed(2)
        metrics = [trainer.step(torch.randn(128, 16, generator=g)) for _ in range(5)]
        return model, metrics

    fused, fused_metrics = train(update.update_parameters_)
    plain, plain_metrics = train(update.update_op_by_op_)
    for a, b in zip(fused_metrics, plain_metrics):
        assert a.loss == pytest.approx(b.loss, rel=1e-5) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        assert_same(a, b, name)
