"""Router statistics from forward outputs with known routing."""

import math

import pytest
import torch

from switch_sae import ForwardOutput, SwitchSAE, SwitchSAEConfig
from switch_sae.evals.experts import ExpertStatsAccumulator, expert_stats
from switch_sae.models.losses import load_balancing


def output(probs, experts):
    return ForwardOutput(x_hat=torch.zeros(len(probs), 1), code=None, acts=None,
                         router_probs=torch.tensor(probs), experts=torch.tensor(experts))


def test_known_routing_two_active_experts():
    acc = ExpertStatsAccumulator(3)
    acc.update(output([[0.5, 0.5, 0.0], [0.6, 0.0, 0.4]], [[0, 1], [0, 2]]))
    acc.update(output([[0.0, 0.7, 0.3]], [[1, 2]]))
    stats = acc.result()
    assert stats.n_tokens == 3
    assert stats.load == pytest.approx([2 / 3, 2 / 3, 2 / 3])
    assert stats.load_entropy == pytest.approx(math.log(3))
    assert stats.mean_prob == pytest.approx([1.1 / 3, 1.2 / 3, 0.7 / 3])
    entropies = [math.log(2), -(0.6 * math.log(0.6) + 0.4 * math.log(0.4)), -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))]
    assert stats.router_entropy == pytest.approx(sum(entropies) / 3)
    assert stats.router_entropy_normalised == pytest.approx(sum(entropies) / 3 / math.log(3))
    # f counts every selected expert, as training does: (2, 2, 2) of 6 pairs; balance = 3 * sum f_i P_i
    assert stats.balance_loss == pytest.approx(3 * sum(1 / 3 * p / 3 for p in (1.1, 1.2, 0.7)))
    assert stats.coactivation == [[2, 1, 1], [1, 2, 1], [1, 1, 2]]
    assert stats.coactivation_conditional[0] == pytest.approx([1.0, 0.5, 0.5])


def test_expert_stats_runs_the_sae():
    torch.manual_seed(0)
    sae = SwitchSAE(SwitchSAEConfig(d_in=8, n_experts=4, d_expert=4, k=2))
    x = torch.randn(50, 8)
    stats = expert_stats(sae, x.split(16))
    out = sae(x)
    counts = torch.bincount(out.experts[:, 0], minlength=4).double() / 50
    assert stats.load == pytest.approx(counts.tolist())
    assert sum(stats.load) == pytest.approx(1.0)
    assert stats.mean_prob == pytest.approx(out.router_probs.mean(0).tolist(), abs=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="n_experts"):
        ExpertStatsAccumulator(0)
    with pytest.raises(ValueError, match="no tokens"):
        ExpertStatsAccumulator(2).result()
    with pytest.raises(ValueError, match="router_probs"):
        ExpertStatsAccumulator(2).update(ForwardOutput(torch.zeros(1, 1), None, torch.zeros(1, 1)))


def test_balance_uses_the_training_definition_of_load():
    torch.manual_seed(0)
    sae = SwitchSAE(SwitchSAEConfig(d_in=8, n_experts=4, d_expert=4, k=2, n_active=2))
    x = torch.randn(64, 8)
    with torch.no_grad():
        out = sae(x)
    stats = expert_stats(sae, x.split(20))  # uneven batches: the load is weighted by pairs
    assert stats.balance_loss == pytest.approx(load_balancing(out.router_probs, out.experts).item(), rel=1e-5)
