"""Turn what the pass gathered into the JSON the site loads: index rows and feature records.

An example context is ``[start, token, activation, [q...]]``: activation rows ``start``..
(``start + len(q) - 1``) of the held-out tokens (clipped to the example's own context),
the row that fired, its activation, and per row the feature's activation as a percentage
of its maximum (integers keep the site small; the exact value of the example is given).

Feature records leave out what a feature without firings cannot have (examples, logit
effects are still given); numbers carry 3 significant digits.

What it leaves out: the HTML (``site``, templates).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..evals.geometry import NearestNeighbours
from .config import DashboardConfig
from .effects import LogitEffects
from .gather import Activity


def sig(x: float) -> float:
    """``x`` rounded to 3 significant digits (for compact JSON)."""
    return float(f"{x:.3g}")


def band_picks(sample_values: Tensor, filled: Tensor, bands: int, per_band: int) -> Tensor:
    """``[d_sae, bands, per_band]`` slots of the ascending sample to show (-1: none).

    Band b of a feature with c sampled firings is the sorted slots ``[b c / bands, (b+1) c / bands)``;
    ``per_band`` slots are spread evenly inside it.
    """
    c = filled.unsqueeze(1).unsqueeze(2)  # [d_sae, 1, 1]
    b = torch.arange(bands).view(1, -1, 1)
    lo, hi = b * c // bands, (b + 1) * c // bands
    j = torch.arange(per_band).view(1, 1, -1)
    picks = lo + ((2 * j + 1) * (hi - lo)) // (2 * per_band)
    return torch.where((hi > lo) & (j < hi - lo), picks, -1)


class ExampleWriter:
    """Builds example contexts with per-token activations from the firing index."""

    def __init__(self, activity: Activity, cfg: DashboardConfig) -> None:
        self.activity, self.cfg = activity, cfg
        self.per_context = activity.positions_per_context

    def windows(self, features: Tensor, tokens: Tensor, maxima: Tensor) -> list[list[int]]:
        """Per (feature, token) pair, the percentages of the window around the token."""
        offsets = torch.arange(-self.cfg.left, self.cfg.right + 1)  # [window]
        rows = tokens.unsqueeze(1) + offsets  # [m, window]
        context_start = (tokens // self.per_context * self.per_context).unsqueeze(1)
        inside = (rows >= context_start) & (rows < context_start + self.per_context)
        acts = self.activity.firings.lookup(features.unsqueeze(1).expand_as(rows), rows.clamp_min(0))
        q = torch.round(100 * acts / maxima.unsqueeze(1).clamp_min(1e-12)).clamp(0, 100).long()
        return [row[mask].tolist() for row, mask in zip(q, inside)]

    def examples(self, feature: int, tokens: Tensor, values: Tensor, maximum: float) -> list[list[Any]]:
        if tokens.numel() == 0:
            return []
        features = torch.full_like(tokens, feature)
        windows = self.windows(features, tokens, torch.full(tokens.shape, maximum))
        starts = torch.maximum(tokens - self.cfg.left, tokens // self.per_context * self.per_context)
        return [[int(s), int(t), sig(float(v)), w] for s, t, v, w in zip(starts, tokens, values, windows)]


def index_rows(activity: Activity, top_token_text: list[str], d_expert: int | None) -> list[list[Any]]:
    """``[id, expert, frequency, mean activation, max activation, top tokens]`` per feature."""
    rec = activity.recorder
    freq, mean, top_max = rec.frequency.tolist(), rec.mean_activation.tolist(), rec.top.values[:, 0].tolist()
    return [
        [f, f // d_expert if d_expert else 0, sig(freq[f]), sig(mean[f]), sig(top_max[f]), top_token_text[f]]
        for f in range(rec.d_sae)
    ]


def histogram_record(counts: Tensor) -> list[int]:
    """``[first bin, counts...]`` trimmed to the non-empty range (empty list if none)."""
    nonzero = torch.nonzero(counts).flatten()
    if nonzero.numel() == 0:
        return []
    lo, hi = int(nonzero[0]), int(nonzero[-1]) + 1
    return [lo, *counts[lo:hi].tolist()]


def feature_records(
    activity: Activity,
    cfg: DashboardConfig,
    logits: LogitEffects | None,
    logit_rows: dict[int, int],
    near: NearestNeighbours,
    d_expert: int | None,
) -> list[dict[str, Any]]:
    """One dict per feature (see the module docstring), in feature order."""
    rec = activity.recorder
    writer = ExampleWriter(activity, cfg)
    order = rec.sample.values.argsort(dim=1)  # ascending activation; empty slots (0) first
    sample_tokens = rec.sample.tokens.gather(1, order)
    sample_values = rec.sample.values.gather(1, order)
    filled = (rec.sample.tokens >= 0).sum(1)
    empty = rec.sample.tokens.shape[1] - filled
    picks = band_picks(sample_values, filled, cfg.bands, cfg.band_examples)
    histograms = rec.histograms()
    records = []
    for f in range(rec.d_sae):
        record: dict[str, Any] = {"id": f, "fires": int(rec.fires[f])}
        if d_expert:
            record["expert"] = f // d_expert
        record["neighbours"] = [[int(i), sig(float(c))] for i, c in zip(near.index[f], near.cos[f])]
        if record["fires"]:
            maximum = float(rec.top.values[f, 0])
            top_tokens, top_values = rec.top.examples(f)
            record["max"] = sig(maximum)
            record["histogram"] = histogram_record(histograms[f])
            record["top"] = writer.examples(f, top_tokens, top_values, maximum)
            record["bands"] = []
            for b in range(cfg.bands):
                slots = picks[f, b][picks[f, b] >= 0].unique() + empty[f]
                if slots.numel() == 0:
                    continue
                lo_slot = empty[f] + b * filled[f] // cfg.bands
                hi_slot = empty[f] + (b + 1) * filled[f] // cfg.bands - 1
                record["bands"].append({
                    "low": sig(float(sample_values[f, lo_slot])), "high": sig(float(sample_values[f, hi_slot])),
                    "examples": writer.examples(f, sample_tokens[f, slots], sample_values[f, slots], maximum),
                })
        if logits is not None and f in logit_rows:
            r = logit_rows[f]
            record["logits_top"] = [[int(i), sig(float(v))] for i, v in zip(logits.top_ids[r], logits.top_values[r])]
            record["logits_bottom"] = [[int(i), sig(float(v))] for i, v in zip(logits.bottom_ids[r], logits.bottom_values[r])]
        if activity.routing is not None:
            routing = activity.routing
            record["routing"] = {"would_fire": int(routing.would_fire[f]), "elsewhere": int(routing.elsewhere[f]),
                                 "by_expert": routing.by_expert[f].tolist()}
        records.append(record)
    return records
