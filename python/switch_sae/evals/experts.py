"""How a Switch SAE's router uses its experts over an eval set.

Accumulates, from ``ForwardOutput``s (``router_probs [batch, n_experts]`` and
``experts [batch, n_active]``) batch after batch, without keeping per-token data:

- load: fraction of tokens routed to each expert (sums to ``n_active``), and its entropy;
- mean router probability per expert, mean per-token router entropy (nats and / log N);
- the Switch-Transformer balance term ``N * sum_i f_i P_i`` (1 at perfect balance), with
  ``f`` defined once for training and evaluation by ``models.losses.expert_load`` (the
  share of (token, expert) pairs, counting every selected expert; the paper's top-1 load
  when ``n_active = 1``);
- co-activation ``[n_experts, n_experts]``: tokens that select both experts (the diagonal is
  the load count), and ``P(B selected | A selected)``, meaningful for ``n_active > 1``.

What it leaves out: running the SAE (callers pass its outputs, or use ``expert_stats``) and
per-feature statistics (dead/dense features live with the other metrics).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ..models.losses import expert_load
from ..utils.checks import check_int


@dataclass
class ExpertStats:
    """Router statistics over an eval set (plain lists, so it serialises to JSON as is)."""

    n_tokens: int
    load: list[float]
    """[n_experts] fraction of tokens that select each expert (sums to n_active)."""
    mean_prob: list[float]
    """[n_experts] mean router probability of each expert."""
    load_entropy: float
    """Entropy (nats) of the normalised load; log(n_experts) when perfectly balanced."""
    router_entropy: float
    """Mean over tokens of the entropy (nats) of the router distribution."""
    router_entropy_normalised: float
    """router_entropy / log(n_experts): 0 = always certain, 1 = uniform."""
    balance_loss: float
    """n_experts * sum_i f_i P_i with f as training defines it (``models.losses.expert_load``); 1 at perfect balance."""
    coactivation: list[list[float]]
    """[n_experts, n_experts] tokens selecting both experts (diagonal: tokens selecting one)."""
    coactivation_conditional: list[list[float]]
    """[n_experts, n_experts] P(column expert selected | row expert selected)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ExpertStatsAccumulator:
    """Feed ``update(output)`` with each batch's ``ForwardOutput``, then call ``result()``."""

    def __init__(self, n_experts: int) -> None:
        check_int("n_experts", n_experts)
        self.n_experts = n_experts
        self.n_tokens = 0
        self.prob_sum = torch.zeros(n_experts, dtype=torch.float64)
        self.pair_load = torch.zeros(n_experts, dtype=torch.float64)  # sum over batches of f * pairs
        self.n_pairs = 0
        self.entropy_sum = 0.0
        self.coactivation = torch.zeros(n_experts, n_experts, dtype=torch.float64)

    @torch.no_grad()
    def update(self, output: Any) -> None:
        probs, experts = output.router_probs, output.experts
        if probs is None or experts is None:
            raise ValueError("output has no router_probs/experts: expert statistics need a Switch SAE's output")
        probs = probs.reshape(-1, probs.shape[-1]).double().cpu()  # [batch, n_experts]
        experts = experts.reshape(-1, experts.shape[-1]).cpu()  # [batch, n_active]
        if probs.shape[-1] != self.n_experts:
            raise ValueError(f"router_probs has {probs.shape[-1]} experts, the accumulator {self.n_experts}")
        selected = torch.zeros_like(probs).scatter_(1, experts, 1.0)  # [batch, n_experts] 0/1
        self.n_tokens += probs.shape[0]
        self.prob_sum += probs.sum(0)
        # f of the whole set = pair-weighted mean of the batches' f
        self.pair_load += expert_load(experts, self.n_experts).double() * experts.numel()
        self.n_pairs += experts.numel()
        self.entropy_sum += float(-(probs * probs.clamp_min(1e-30).log()).sum())
        self.coactivation += selected.T @ selected

    def result(self) -> ExpertStats:
        if self.n_tokens == 0:
            raise ValueError("no tokens were accumulated: call update() with at least one batch first")
        n, N = self.n_tokens, self.n_experts
        counts = self.coactivation.diagonal()
        load = counts / n
        share = counts / counts.sum()
        load_entropy = float(-(share * share.clamp_min(1e-30).log()).sum())
        mean_prob = self.prob_sum / n
        router_entropy = self.entropy_sum / n
        conditional = self.coactivation / counts.clamp_min(1).unsqueeze(1)
        return ExpertStats(
            n_tokens=n,
            load=load.tolist(),
            mean_prob=mean_prob.tolist(),
            load_entropy=load_entropy,
            router_entropy=router_entropy,
            router_entropy_normalised=router_entropy / math.log(N) if N > 1 else 0.0,
            balance_loss=float(N * ((self.pair_load / self.n_pairs) * mean_prob).sum()),
            coactivation=self.coactivation.tolist(),
            coactivation_conditional=conditional.tolist(),
        )


@torch.no_grad()
def expert_stats(sae: Any, batches: Iterable[Tensor]) -> ExpertStats:
    """Run ``sae`` on each ``[batch, d_in]`` tensor of ``batches`` and accumulate its routing."""
    n_experts = getattr(sae.cfg, "n_experts", None)
    if n_experts is None:
        raise ValueError(f"expert statistics need a Switch SAE; got a {type(sae).__name__} without n_experts")
    acc = ExpertStatsAccumulator(n_experts)
    for x in batches:
        acc.update(sae(x))
    return acc.result()
