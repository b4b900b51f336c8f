"""Tests of switch_sae.models.routed: the stages of the TopK-family forward pass, and the
exchange seam between dispatch and encode where expert parallelism will move tokens."""

from __future__ import annotations

import pytest
import torch

from switch_sae import BatchTopKSAE, BatchTopKSAEConfig, SwitchSAE, SwitchSAEConfig, TopKSAE, TopKSAEConfig
from switch_sae.models.base import SparseCode
from switch_sae.models.routed import Grouped, LocalExchange, combine, dispatch, encode


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


class ShuffledExchange(LocalExchange):
    """A one-process stand-in for an all-to-all: the experts receive their pairs' tokens as one
    ``[rows, d_in]`` block in expert order, shuffled within each expert, as a receiving rank
    holds them; the codes go back to pair order (decoding stays local). It moves every row, so if a stage relied on
    the local layout, outputs or gradients would change."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0

    def __call__(self, grouped: Grouped):
        self.calls += 1
        offsets = grouped.offsets.tolist()
        shuffle = torch.cat([start + torch.randperm(end - start, generator=self.generator)
                             for start, end in zip(offsets, offsets[1:])])  # [rows]
        pairs = grouped.order[shuffle]  # received row i is pair pairs[i]
        rows = pairs.numel()
        received = Grouped(tokens=grouped.tokens[pairs // grouped.n_active], order=torch.arange(rows),
                           offsets=grouped.offsets, n_active=1)
        position = torch.empty_like(pairs)
        position[pairs] = torch.arange(rows)  # pair p was received as row position[p]

        def back(code: SparseCode) -> SparseCode:
            return SparseCode(code.values[position], code.indices[position])

        return received, back


MODELS = {
    "switch": lambda: SwitchSAE(SwitchSAEConfig(d_in=12, n_experts=5, d_expert=10, k=3)),
    "switch-multi": lambda: SwitchSAE(SwitchSAEConfig(d_in=12, n_experts=5, d_expert=10, k=3, n_active=2,
                                                      use_encoder_bias=True, feature_scaling=True)),
    "switch-renormalized": lambda: SwitchSAE(SwitchSAEConfig(d_in=12, n_experts=4, d_expert=6, k=4, n_active=3,
                                                             gate="renormalized")),
    "topk": lambda: TopKSAE(TopKSAEConfig(d_in=12, d_sae=40, k=3)),
    "batchtopk": lambda: BatchTopKSAE(BatchTopKSAEConfig(d_in=12, d_sae=40, k=3)),
}


def loss_and_grads(sae, x, dead):
    """Forward, every training term (AuxK included), backward: the outputs and all gradients."""
    x = x.clone().requires_grad_(True)
    out = sae(x)
    terms = sae.training_terms(x, out, dead)
    sum(terms.values()).backward()
    grads = {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}
    return out, terms, {**grads, "x": x.grad}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_an_exchange_between_dispatch_and_encode_changes_nothing(name):
    torch.manual_seed(0)
    local = MODELS[name]()
    exchanged = MODELS[name]()
    exchanged.load_state_dict(local.state_dict())
    exchanged.exchange = ShuffledExchange(seed=1)
    x = torch.randn(33, 12)
    dead = torch.rand(local.d_sae) < 0.5  # so the AuxK pass goes through the exchange too
    out_a, terms_a, grads_a = loss_and_grads(local, x, dead)
    out_b, terms_b, grads_b = loss_and_grads(exchanged, x, dead)
    assert exchanged.exchange.calls == 2  # the forward pass and the AuxK pass
    torch.testing.assert_close(out_b.x_hat, out_a.x_hat)
    torch.testing.assert_close(out_b.code.values, out_a.code.values)
    assert torch.equal(out_b.code.indices, out_a.code.indices)
    torch.testing.assert_close(terms_b, terms_a)
    assert grads_b.keys() == grads_a.keys()
    torch.testing.assert_close(grads_b, grads_a)


def test_the_stages_compose_to_the_forward_pass():
    torch.manual_seed(0)
    sae = SwitchSAE(SwitchSAEConfig(d_in=8, n_experts=4, d_expert=6, k=2, n_active=2))
    x = torch.randn(10, 8)
    _, gates, experts = sae.route(x)
    grouped = dispatch(x, experts, n_experts=4)
    assert grouped.counts.tolist() == torch.bincount(experts.flatten(), minlength=4).tolist()
    per_pair = encode(grouped, sae.encoder_weight(), sae.b_enc, sae.b_dec, k=2, tile_rows=4)  # [20, 2]
    assert per_pair.values.shape == (20, 2)
    code = combine(per_pair, gates, n_active=2)
    torch.testing.assert_close(code.values, sae(x).code.values)
    assert torch.equal(code.indices, sae(x).code.indices)


def test_combine_with_one_expert_and_no_gates_is_the_identity():
    code = SparseCode(torch.rand(5, 3), torch.randint(0, 9, (5, 3)))
    out = combine(code, None, n_active=1)
    assert out.values is code.values and out.indices is code.indices
