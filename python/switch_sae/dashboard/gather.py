"""One pass over held-out tokens: language model -> hook activations -> SAE -> per-feature records.

The tokens are harvested batch by batch (with a progress bar) and each batch's SAE code is
turned into firings (token, feature, value > 0), which feed a ``FeatureRecorder`` (counts,
histograms, streaming top examples and a random sample per feature) and a
``FiringIndex``, from which the dashboard reads each feature's activation on the tokens
around its examples (per-token highlighting). For a Switch SAE it also accumulates the
router's expert load and, per feature, where the router sent the tokens that would fire
it: every expert encodes every token (as if the router had chosen it), and a feature
"would fire" on a token when it is in its expert's top k there.

Memory: ``O(d_sae * examples)`` for the records plus ``O(tokens * L0)`` for the firing
index; a ``[tokens, d_sae]`` tensor never exists (dense-code SAEs are run in row chunks
of at most ``2**24 / d_sae`` tokens).

What it leaves out: decoder-only statistics (``effects``) and writing the site (``site``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..activations import batched, iter_activations
from ..evals.experts import ExpertStats, ExpertStatsAccumulator
from ..models import SwitchSAE
from ..models.routed import encode_routed
from .streaming import FeatureRecorder

DENSE_BUDGET = 2**24  # dense-code elements per SAE call (64 MiB of float32)


class FiringIndex:
    """Every firing of the pass, sorted by (feature, token), to look activations up."""

    def __init__(self, n_tokens: int) -> None:
        self.n_tokens = n_tokens
        self._keys: list[Tensor] = []
        self._values: list[Tensor] = []
        self.keys = torch.empty(0, dtype=torch.int64)
        self.values = torch.empty(0)

    def add(self, tokens: Tensor, features: Tensor, values: Tensor) -> None:
        self._keys.append(features.long() * self.n_tokens + tokens)
        self._values.append(values.half())

    def finish(self) -> None:
        keys = torch.cat(self._keys) if self._keys else torch.empty(0, dtype=torch.int64)
        values = torch.cat(self._values) if self._values else torch.empty(0, dtype=torch.float16)
        self.keys, order = keys.sort()
        self.values = values[order].float()
        self._keys, self._values = [], []

    def lookup(self, features: Tensor, tokens: Tensor) -> Tensor:
        """Activation of ``features[i]`` on ``tokens[i]`` (0 where it did not fire)."""
        if self.keys.numel() == 0:
            return torch.zeros(features.shape)
        query = features.long() * self.n_tokens + tokens.long()
        at = torch.searchsorted(self.keys, query).clamp_max(self.keys.numel() - 1)
        return torch.where(self.keys[at] == query, self.values[at], 0.0)


@dataclass
class RoutingRecord:
    """Switch SAEs only: where the router sent the tokens each feature would fire on."""

    stats: ExpertStats
    """Expert load and router entropy over the pass."""
    would_fire: Tensor
    """[d_sae] tokens on which the feature is in its expert's top k (if routed there)."""
    elsewhere: Tensor
    """[d_sae] of those, tokens the router did not send to the feature's expert."""
    by_expert: Tensor
    """[d_sae, n_experts] of those, the router's first-choice expert of each token."""


@dataclass
class Activity:
    """What the pass saw: the tokens, the per-feature records, and the routing."""

    tokens: Tensor
    """[n_contexts, context_size] token ids; activation row g is context g // (context_size - 1), position g % (context_size - 1) + 1 (the first position is not encoded)."""
    recorder: FeatureRecorder
    firings: FiringIndex
    routing: RoutingRecord | None

    @property
    def positions_per_context(self) -> int:
        return self.tokens.shape[1] - 1


def firings_of(sae: Any, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Any]:
    """``(token, feature, value)`` of every positive activation in ``sae(x)``, and the output."""
    out = sae(x)
    if out.code is not None:
        values, indices = out.code  # [batch, k]
        rows = torch.arange(values.shape[0], device=values.device).unsqueeze(1).expand_as(values)
        fired = values > 0
        return rows[fired], indices[fired], values[fired], out
    rows, features = torch.nonzero(out.acts > 0, as_tuple=True)  # acts [batch, d_sae]
    return rows, features, out.acts[rows, features], out


class RoutingCounter:
    """Counts, per feature, the tokens that would fire it and where the router sent them."""

    def __init__(self, sae: SwitchSAE) -> None:
        E = sae.cfg.n_experts
        self.sae = sae
        self.stats = ExpertStatsAccumulator(E)
        self.would_fire = torch.zeros(sae.d_sae, dtype=torch.int64)
        self.elsewhere = torch.zeros(sae.d_sae, dtype=torch.int64)
        self.by_expert = torch.zeros(sae.d_sae * E, dtype=torch.int64)

    @torch.no_grad()
    def update(self, x: Tensor, out: Any) -> None:
        self.stats.update(out)
        sae, cfg = self.sae, self.sae.cfg
        x = x.to(sae.W_dec_flat.dtype)
        chosen = out.experts.cpu()  # [batch, n_active]
        first = chosen[:, 0]
        W_enc = sae.encoder_weight()
        for e in range(cfg.n_experts):
            forced = torch.full((x.shape[0], 1), e, dtype=torch.int64, device=x.device)
            values, indices = encode_routed(
                x, W_enc, sae.b_enc, sae.b_dec, None, forced, cfg.k, cfg.tile_rows, sae.exchange
            )
            rows, slot = torch.nonzero(values.cpu() > 0, as_tuple=True)
            features = indices.cpu()[rows, slot]
            self.would_fire += torch.bincount(features, minlength=sae.d_sae)
            away = ~(chosen[rows] == e).any(dim=1)
            self.elsewhere += torch.bincount(features[away], minlength=sae.d_sae)
            self.by_expert.index_add_(0, features * cfg.n_experts + first[rows], torch.ones_like(features))

    def result(self) -> RoutingRecord:
        return RoutingRecord(self.stats.result(), self.would_fire, self.elsewhere,
                             self.by_expert.view(self.sae.d_sae, self.sae.cfg.n_experts))


@torch.no_grad()
def gather(
    sae: Any,
    lm: Any,
    tokens: Tensor,
    hook_name: str,
    *,
    n_top: int,
    n_sample: int,
    harvest_batch: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> Activity:
    """Run ``lm`` then ``sae`` over ``tokens [n_contexts, context_size]`` once and record every feature."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [n_contexts, context_size >= 2], got {tuple(tokens.shape)}")
    per_context = tokens.shape[1] - 1
    n_tokens = tokens.shape[0] * per_context
    recorder = FeatureRecorder(sae.d_sae, n_top, n_sample, seed=seed)
    firings = FiringIndex(n_tokens)
    routing = RoutingCounter(sae) if isinstance(sae, SwitchSAE) else None
    rows_per_call = n_tokens if getattr(sae.cfg, "k", None) else max(1, DENSE_BUDGET // sae.d_sae)
    device = sae.W_dec_flat.device
    start = 0
    batches = batched(iter(tokens), harvest_batch)
    for _, acts in iter_activations(lm, batches, hook_name, drop_first=True, total_tokens=tokens.numel(), progress=progress):
        acts = acts[hook_name]  # [harvest_batch * per_context, d_in]
        for lo in range(0, acts.shape[0], rows_per_call):
            x = acts[lo : lo + rows_per_call].to(device)
            rows, features, values, out = firings_of(sae, x)
            rows, features, values = rows.cpu() + start + lo, features.cpu(), values.float().cpu()
            recorder.update(x.shape[0], rows, features, values)
            firings.add(rows, features, values)
            if routing is not None:
                routing.update(x, out)
        start += acts.shape[0]
    firings.finish()
    return Activity(tokens.cpu(), recorder, firings, routing.result() if routing is not None else None)
