"""What a feature's decoder direction does downstream: logit effects and nearest features.

Logit effects follow SAE-Vis: the direction ``W_dec[f]`` is read by the unembedding
``W_U`` after the model's final norm. A norm's per-token scale is a positive factor shared
by every vocabulary entry, so the ranking is that of ``(center(W_dec[f]) * w_ln) @ W_U``,
centring only for LayerNorm and ``w_ln`` the norm's weight where the model keeps one
(TransformerLens folds it into ``W_U`` by default). It only means something where the
hook is in the residual stream (``d_in == d_model``); elsewhere there is no logit effect.

What it leaves out: activations (``gather``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..evals.geometry import NearestNeighbours, top_neighbours

LOGIT_CHUNK = 1024  # features unembedded at once: 1024 x d_vocab logits


class LogitEffects(NamedTuple):
    """Per feature, the vocabulary entries its direction promotes and suppresses most."""

    top_ids: Tensor  # [n_features, n] int64, largest first
    top_values: Tensor  # [n_features, n]
    bottom_ids: Tensor  # [n_features, n] int64, smallest first
    bottom_values: Tensor  # [n_features, n]


def _final_norm_weight(lm: Any, d_model: int) -> Tensor | None:
    norm = getattr(lm, "ln_final", None)
    for name in ("w", "weight"):
        weight = getattr(norm, name, None)
        if isinstance(weight, Tensor) and weight.shape == (d_model,):
            return weight.detach()
    original = getattr(norm, "original_component", None)  # TransformerBridge wraps the HF norm
    weight = getattr(original, "weight", None)
    return weight.detach() if isinstance(weight, Tensor) and weight.shape == (d_model,) else None


def unembedding(lm: Any, d_in: int) -> tuple[Tensor, Tensor | None, bool] | None:
    """``(W_U [d_model, d_vocab], final-norm weight or None, centre?)``, or None when the
    SAE's width is not the model's residual width (no logit effect to show)."""
    W_U = getattr(lm, "W_U", None)
    if not isinstance(W_U, Tensor) or W_U.shape[0] != d_in:
        return None
    normalization = str(getattr(getattr(lm, "cfg", None), "normalization_type", "") or "")
    return W_U.detach(), _final_norm_weight(lm, d_in), normalization.startswith("LN")


@torch.no_grad()
def logit_effects(lm: Any, W_dec: Tensor, features: Tensor, n: int) -> LogitEffects | None:
    """Top and bottom ``n`` tokens of ``W_dec[features] @ W_U`` through the final norm."""
    unembed = unembedding(lm, W_dec.shape[1])
    if unembed is None:
        return None
    W_U, weight, centre = unembed
    n = min(n, W_U.shape[1])
    parts: list[list[Tensor]] = [[], [], [], []]
    for start in range(0, features.numel(), LOGIT_CHUNK):
        rows = W_dec[features[start : start + LOGIT_CHUNK].to(W_dec.device)].to(W_U)  # [chunk, d_model]
        if centre:
            rows = rows - rows.mean(dim=-1, keepdim=True)
        if weight is not None:
            rows = rows * weight.to(rows)
        logits = rows @ W_U  # [chunk, d_vocab]
        top, bottom = logits.topk(n, dim=-1), logits.topk(n, dim=-1, largest=False)
        for part, value in zip(parts, (top.indices, top.values, bottom.indices, bottom.values)):
            part.append(value.float().cpu() if value.is_floating_point() else value.cpu())
    return LogitEffects(*(torch.cat(p) if p else torch.empty(0, n) for p in parts))


def neighbours(sae: Any, n: int) -> NearestNeighbours:
    """The ``n`` nearest features of every feature by decoder cosine, across experts."""
    n = min(n, sae.d_sae - 1)
    result = top_neighbours(sae.W_dec_flat, n)
    return NearestNeighbours(result.cos.cpu(), result.index.cpu())
