"""The decoder-gradient projection on blocks of rows (``SAE.remove_decoder_parallel_grad_``)
against the same formula on the whole matrix, alone and inside training steps."""

from __future__ import annotations

import pytest
import torch

from switch_sae.models import SwitchSAE, SwitchSAEConfig, TopKSAE, TopKSAEConfig, base
from switch_sae.parallel.strategy import SingleProcess
from switch_sae.training import TrainConfig, Trainer

MODELS = {
    "switch": lambda: SwitchSAE(SwitchSAEConfig(d_in=16, n_experts=4, d_expert=25, k=4)),
    "topk": lambda: TopKSAE(TopKSAEConfig(d_in=16, d_sae=100, k=4)),
}
SEVEN_ROWS = 7 * 16 * 4  # bytes of 7 float32 rows of 16: 15 blocks of 100 rows, the last short


def whole_matrix_projection(model) -> torch.Tensor:
    """The projection as one expression on the whole matrix: what the blocks must equal."""
    W = model.W_dec_flat.detach()
    G = model.W_dec.grad.view(W.shape)
    return G - (G * W).sum(dim=-1, keepdim=True) * W


@pytest.mark.parametrize("name", sorted(MODELS))
def test_blocked_projection_equals_the_whole_matrix_formula(monkeypatch, name):
    monkeypatch.setattr(base, "DECODER_BLOCK_BYTES", SEVEN_ROWS)
    torch.manual_seed(0)
    model = MODELS[name]()
    assert len(base.row_blocks(model.W_dec_flat)) == 15
    model(torch.randn(64, 16)).x_hat.square().sum().backward()
    want = whole_matrix_projection(model)
    model.remove_decoder_parallel_grad_()
    got = model.W_dec.grad.view(want.shape)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-9)
    along_rows = (got * model.W_dec_flat.detach()).sum(-1).abs().max()
    assert along_rows < 1e-6 * want.norm(dim=-1).max()  # every row's gradient is orthogonal to it


def test_blocks_cover_every_row_once():
    W = torch.zeros(1000, 64)
    blocks = base.row_blocks(W)
    assert torch.equal(torch.cat([torch.arange(1000)[b] for b in blocks]), torch.arange(1000))
    assert all(b.stop - b.start == base.DECODER_BLOCK_BYTES // (64 * 4) for b in blocks[:-1])


def test_training_with_blocks_equals_training_on_the_whole_matrix(monkeypatch):
    def train(block_bytes):
        monkeypatch.setattr(base, "DECODER_BLOCK_BYTES", block_bytes)
        torch.manual_seed(0)
        model = MODELS["switch"]()
        trainer = Trainer(model, TrainConfig(total_steps=5, grad_clip=0.5, progress=False))
        g = torch.Generator().manual_seed(2)
        return model, [trainer.step(torch.randn(128, 16, generator=g)) for _ in range(5)]

    blocked, blocked_metrics = train(SEVEN_ROWS)
    whole, whole_metrics = train(1 << 40)  # one block: the projection as it was on the whole matrix
    for a, b in zip(blocked_metrics, whole_metrics):
        assert a.loss == pytest.approx(b.loss, rel=1e-5) and a.grad_norm == pytest.approx(b.grad_norm, rel=1e-5)
    assert blocked_metrics[0].grad_norm > 0.5  # clipping is exercised
    for (name, a), b in zip(blocked.named_parameters(), whole.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("max_norm", [0.1, 1e4])  # clipped, and left alone
def test_clipping_equals_torch_clip_grad_norm(max_norm):
    torch.manual_seed(0)
    ours, theirs = MODELS["topk"](), MODELS["topk"]()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(32, 16)
    for model in (ours, theirs):
        model(x).x_hat.square().sum().backward()
    total = SingleProcess().clip_grad_norm_(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert (total.item() > max_norm) is (max_norm == 0.1)
    for mine, reference in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-6, atol=0)
