"""``build_dashboard``: from a trained SAE, a model and held-out tokens to a static site.

Steps: one pass over the tokens (``gather``), decoder-only statistics (nearest features,
logit effects of the features that fired, expert similarity), then the records and the
pages (``records``, ``site``). Every step has a progress line or bar.

What it leaves out: choosing the model, the text and the SAE (``switch-sae dashboard``).
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..evals.geometry import expert_similarity, off_diagonal_mean
from ..models import SwitchSAE
from .config import DashboardConfig
from .effects import logit_effects, neighbours
from .gather import Activity, gather
from .records import feature_records, index_rows
from .site import write_site

TOP_TOKENS_SHOWN = 3


def token_strings(tokenizer: Any, ids: list[int]) -> dict[int, str]:
    """Each vocabulary id as the text it decodes to (``<id>`` for a model without a tokenizer)."""
    if tokenizer is None:
        return {i: f"<{i}>" for i in ids}
    return dict(zip(ids, tokenizer.batch_decode([[i] for i in ids])))


def top_token_text(activity: Activity, vocab: dict[int, str]) -> list[str]:
    """Per feature, the most common tokens among its top examples (what the index searches)."""
    flat = activity.tokens[:, 1:].reshape(-1)  # [n_tokens] ids of the activation rows
    tops = activity.recorder.top.tokens
    ids = torch.where(tops >= 0, flat[tops.clamp_min(0)], -1).tolist()
    texts = []
    for row in ids:
        common = collections.Counter(i for i in row if i >= 0).most_common(TOP_TOKENS_SHOWN)
        texts.append(" | ".join(vocab[i].replace("\n", "↵") for i, _ in common))
    return texts


def expert_panel(sae: SwitchSAE, activity: Activity) -> dict[str, Any]:
    """Router statistics and the expert-similarity matrix of a Switch SAE."""
    stats = activity.routing.stats
    similarity = expert_similarity(sae, sae.cfg.n_experts) if sae.cfg.d_expert > 1 else torch.zeros(1, 1)
    return {"load": stats.load, "mean_prob": stats.mean_prob, "router_entropy_normalised": stats.router_entropy_normalised,
            "balance_loss": stats.balance_loss, "similarity": [[round(v, 4) for v in row] for row in similarity.tolist()],
            "within": float(similarity.diagonal().mean()), "across": off_diagonal_mean(similarity)}


def describe(sae: Any, hook_name: str, model_name: str, n_tokens: int, title: str) -> dict[str, Any]:
    meta = {"title": title, "architecture": sae.architecture, "d_sae": sae.d_sae, "d_in": sae.d_in,
            "hook_name": hook_name, "model_name": model_name, "n_tokens": n_tokens}
    if isinstance(sae, SwitchSAE):
        meta.update(n_experts=sae.cfg.n_experts, d_expert=sae.cfg.d_expert, n_active=sae.cfg.n_active)
    return meta


@torch.no_grad()
def build_dashboard(
    sae: Any,
    lm: Any,
    tokens: Tensor,
    hook_name: str,
    out: str | Path,
    cfg: DashboardConfig | None = None,
    *,
    title: str = "",
    model_name: str = "",
    harvest_batch: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Gather ``sae``'s features over ``tokens [n_contexts, context_size]`` read from ``lm``
    at ``hook_name`` and write the dashboard into ``out``; returns the path of index.html."""
    cfg = cfg or DashboardConfig()
    sae.eval()
    say = print if progress else (lambda *_: None)
    activity = gather(sae, lm, tokens, hook_name, n_top=cfg.top_examples, n_sample=cfg.sample_size,
                      harvest_batch=harvest_batch, seed=seed, progress=progress)
    say("dashboard: nearest features by decoder cosine")
    near = neighbours(sae, cfg.neighbours)
    alive = torch.nonzero(activity.recorder.fires > 0).flatten()
    say(f"dashboard: logit effects of the {alive.numel():,} features that fired")
    logits = logit_effects(lm, sae.W_dec_flat.detach(), alive, cfg.logit_tokens)
    logit_rows = {int(f): r for r, f in enumerate(alive.tolist())} if logits is not None else {}
    used = set(activity.tokens[:, 1:].reshape(-1).tolist())
    if logits is not None:
        used |= set(logits.top_ids.flatten().tolist()) | set(logits.bottom_ids.flatten().tolist())
    vocab = token_strings(lm.tokenizer, sorted(used))
    d_expert = sae.cfg.d_expert if isinstance(sae, SwitchSAE) else None
    say("dashboard: writing the site")
    records = feature_records(activity, cfg, logits, logit_rows, near, d_expert)
    rows = index_rows(activity, top_token_text(activity, vocab), d_expert)
    experts = expert_panel(sae, activity) if isinstance(sae, SwitchSAE) else None
    meta = describe(sae, hook_name, model_name or getattr(sae.cfg, "model_name", ""), activity.recorder.n_tokens,
                    title or f"{sae.architecture} SAE ({sae.d_sae:,} features)")
    return write_site(Path(out), meta, rows, records, activity.tokens[:, 1:].reshape(-1).tolist(), vocab, experts)
