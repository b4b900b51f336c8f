"""``evaluate(sae, model, tokens, hook_name)``: every headline metric on one fixed token set.

Score every SAE on the same ``tokens [n_contexts, pos]`` (e.g. ``activations.load_tokens``
on held-out text) so numbers are comparable. Per batch of ``batch_size`` contexts (the eval
batch size, separate from training's) it runs the model clean (logits and the activation
at the hook), then with the hook replaced by zeros and by the mean activation, then by each
SAE's reconstruction; the SAE output from the spliced run feeds the reconstruction
metrics, so the SAE runs once per token. Before that, one early-stopped pass over the eval
set computes the mean activation (unless ``mean_activation`` is given).

``evaluate_many(saes, ...)`` scores several SAEs at one hook and shares the clean, zero and
mean runs between them (3 + n_saes model passes per batch instead of 4 n_saes); each
result equals what ``evaluate`` gives for that SAE alone.

Dead latents: see ``evals.dead``; ``run_dir`` (the SAE's training run folder) lets the
training tracker supply the dead count when the eval set is too small to.

Special tokens (by default the tokenizer's BOS, EOS and padding ids) are excluded: left
unpatched, not scored for reconstruction, not CE targets.

What it leaves out: geometry, FLOPs and plots (other modules of ``switch_sae.evals``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..activations.harvest import check_hook_names, check_tokens, flatten_heads, harvest, model_device
from ..utils.checks import check_int
from ..utils.io import atomic_write_json
from ..utils.tables import fmt
from .dead import eval_dead_latents, training_dead_latents
from .experts import ExpertStatsAccumulator
from .metrics import ReconstructionMetrics
from .patching import PatchingMetrics, keep_mask, mean_replacement, run_patched, sae_replacement, zero_replacement


@dataclass
class EvalResult:
    """Metrics of one SAE on one eval set (see ``metrics`` and ``patching`` for definitions)."""

    model_name: str
    hook_name: str
    architecture: str
    d_sae: int
    n_tokens: int
    """Kept tokens scored for reconstruction."""
    mse: float
    nmse: float
    fve: float
    """Fraction of variance explained, textbook (total variance about the mean)."""
    explained_variance_saelens: float
    """SAELens's ``explained_variance`` definition, for comparison with SAELens numbers only."""
    cosine: float
    l2_ratio: float
    l0: float
    unseen_fraction: float
    """Latents that never fired on these tokens: an upper bound on the dead ones (``evals.dead``)."""
    n_unseen: int
    unseen_floor: float
    """The unseen fraction a healthy SAE with this L0 would show on as many tokens: (1 - L0/d_sae)^n_tokens."""
    dead_fraction: float | None
    """Latents silent over ``dead_window_tokens`` (eval or training tokens, see ``dead_source``); None when
    neither the eval nor the training run saw enough tokens to tell dead from unseen."""
    n_dead: int | None
    dead_source: str | None
    """'eval' or 'training' (the run's dead-latent tracker), or None."""
    dead_window_tokens: int | None
    """Tokens over which a dead latent never fired: 10 d_sae / L0, so a healthy latent is missed with odds e^-10."""
    dense_fraction: float
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_mean: float
    delta_ce: float
    loss_recovered_zero: float
    loss_recovered_mean: float
    kl: float
    kl_zero: float
    kl_mean: float
    kl_score: float
    use_error_term: bool = False
    expert_load: list[float] | None = None
    """Switch SAEs: fraction of tokens routed to each expert."""
    router_entropy: float | None = None
    """Switch SAEs: mean per-token router entropy, nats."""
    balance_loss: float | None = None
    """Switch SAEs: n_experts * sum_i f_i P_i, 1 at perfect balance."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """Two-column text table of the scalar metrics."""
        rows = [(k, v) for k, v in self.to_dict().items() if not isinstance(v, (list, dict)) and v is not None]
        if self.dead_fraction is None:
            rows.append(("dead_fraction", f"- (too few tokens: unseen {self.unseen_fraction:.4g} "
                                          f"against {self.unseen_floor:.4g} for a healthy SAE)"))
        if self.expert_load is not None:
            rows.append(("expert_load min/max", f"{min(self.expert_load):.4f} / {max(self.expert_load):.4f}"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {fmt(v, '.6g')}" for k, v in rows)

    def __str__(self) -> str:
        return self.table()

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON (atomically)."""
        return atomic_write_json(_json_safe(self.to_dict()), path)


def _json_safe(obj: Any) -> Any:
    """NaN/inf become None: strict JSON readers reject them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def special_token_ids(model: Any) -> list[int]:
    """The tokenizer's BOS, EOS and padding ids (none for a model without a tokenizer)."""
    tokenizer = getattr(model, "tokenizer", None)
    ids = {getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def mean_activation(model: Any, tokens: Tensor, hook_name: str, *, batch_size: int = 8, keep: Tensor | None = None) -> Tensor:
    """``[d_in]`` mean activation at ``hook_name`` over the kept positions of ``tokens``."""
    total, count = None, 0
    for start in range(0, tokens.shape[0], batch_size):
        act = harvest(model, tokens[start : start + batch_size], hook_name, flatten=False)[hook_name]
        act = act.double()  # [batch, pos, d_in]
        if keep is not None:
            act = act[keep[start : start + batch_size].to(act.device)]
        total = act.reshape(-1, act.shape[-1]).sum(0) + (0 if total is None else total)
        count += act.reshape(-1, act.shape[-1]).shape[0]
    if count == 0:
        raise ValueError("no kept positions to average: every token was excluded")
    return (total / count).float()


@torch.no_grad()
def evaluate(
    sae: Any,
    model: Any,
    tokens: Tensor,
    hook_name: str | None = None,
    *,
    run_dir: str | Path | None = None,
    **options: Any,
) -> EvalResult:
    """Evaluate ``sae`` spliced into ``model`` at ``hook_name`` (default ``sae.cfg.hook_name``)
    on ``tokens [n_contexts, pos]``; see the module docstring. ``run_dir``: the SAE's training
    run folder, for the dead count; ``options``: those of ``evaluate_many``."""
    run_dirs = {"sae": run_dir} if run_dir is not None else None
    return evaluate_many({"sae": sae}, model, tokens, hook_name, run_dirs=run_dirs, **options)["sae"]


class _SAEAccumulators:
    """The running sums of one SAE: reconstruction, its spliced run, and its router."""

    def __init__(self, sae: Any, dense_threshold: float) -> None:
        self.recon = ReconstructionMetrics(sae.d_in, sae.d_sae, dense_threshold=dense_threshold)
        self.patching = PatchingMetrics()
        self.n_experts = getattr(sae.cfg, "n_experts", None)
        self.experts = ExpertStatsAccumulator(self.n_experts) if self.n_experts else None

    def update(self, x: Tensor, output: Any, keep: Tensor) -> None:
        """``x [batch, pos, d_in]`` and the SAE's output on it; ``keep [batch, pos]``."""
        flat_keep = keep.reshape(-1)
        self.recon.update(x.reshape(-1, x.shape[-1]), output, flat_keep)
        if self.experts is not None and flat_keep.any():
            self.experts.update(output._replace(
                router_probs=output.router_probs.reshape(-1, self.n_experts)[flat_keep],
                experts=output.experts.reshape(flat_keep.shape[0], -1)[flat_keep]))


def _check_hook(saes: Mapping[str, Any], hook_name: str | None) -> str:
    """The one hook every SAE is spliced at: ``hook_name``, or the SAEs' common ``cfg.hook_name``."""
    if hook_name:
        return hook_name
    hooks = {getattr(sae.cfg, "hook_name", "") for sae in saes.values()}
    if len(hooks) != 1 or not next(iter(hooks)):
        raise ValueError(f"hook_name is required: pass it, or give every SAE the same cfg.hook_name (got {sorted(hooks)})")
    return hooks.pop()


@torch.no_grad()
def evaluate_many(
    saes: Mapping[str, Any],
    model: Any,
    tokens: Tensor,
    hook_name: str | None = None,
    *,
    batch_size: int = 8,
    exclude_token_ids: Iterable[int] | None = None,
    use_error_term: bool = False,
    mean: Tensor | None = None,
    dense_threshold: float = 0.1,
    run_dirs: Mapping[str, str | Path] | None = None,
    progress: bool = True,
) -> dict[str, EvalResult]:
    """Evaluate every SAE of ``saes`` (by name) at ``hook_name`` on ``tokens [n_contexts, pos]``,
    running the clean, zero- and mean-ablation passes once per batch for all of them.

    Args:
        saes: name -> SAE, all reading the same hook (``hook_name`` or their ``cfg.hook_name``).
        batch_size: contexts per model pass.
        exclude_token_ids: tokens left unpatched and unscored (default: BOS, EOS, padding).
        use_error_term: splice ``x_hat + (x - x_hat).detach()`` (the CE then equals the clean one).
        mean: ``[d_in]`` mean activation for mean ablation; computed over the tokens if None.
        dense_threshold: a latent firing on more than this fraction of tokens is dense.
        run_dirs: name -> training run folder; its newest checkpoint's dead-latent tracker gives
            the dead count when the eval tokens are too few (``evals.dead``).
    Returns:
        name -> ``EvalResult``, in the order of ``saes``.
    """
    if not saes:
        raise ValueError("saes is empty: pass at least one SAE to evaluate")
    unknown = set(run_dirs or {}) - set(saes)
    if unknown:
        raise ValueError(f"run_dirs names SAEs that are not in saes: {sorted(unknown)}")
    hook_name = _check_hook(saes, hook_name)
    check_hook_names(model, hook_name)
    check_int("batch_size", batch_size)
    tokens = check_tokens(tokens).to(model_device(model))
    if tokens.shape[1] < 2:
        raise ValueError(f"tokens must have at least 2 positions to score next-token loss, got {tuple(tokens.shape)}")
    excluded = special_token_ids(model) if exclude_token_ids is None else list(exclude_token_ids)
    keep = keep_mask(tokens, excluded)  # [n_contexts, pos]
    if mean is None:
        mean = mean_activation(model, tokens, hook_name, batch_size=batch_size, keep=keep)

    baselines = PatchingMetrics()  # the clean, zero and mean runs, shared by every SAE
    accumulators = {name: _SAEAccumulators(sae, dense_threshold) for name, sae in saes.items()}
    for start in tqdm(range(0, tokens.shape[0], batch_size), desc="evaluate", disable=not progress):
        batch, batch_keep = tokens[start : start + batch_size], keep[start : start + batch_size]
        clean_logits, cache = model.run_with_cache(batch, names_filter=[hook_name])
        if hook_name not in cache:
            raise ValueError(f"hook {hook_name!r} did not fire; is it a hook name of this model (model.hook_dict)?")
        x = flatten_heads(cache[hook_name])  # [batch, pos, d_in]
        del cache
        baselines.add("clean", batch, clean_logits, clean_logits, batch_keep)
        for run, replace in (("zero", zero_replacement), ("mean", mean_replacement(mean))):
            baselines.add(run, batch, run_patched(model, batch, hook_name, replace, batch_keep), clean_logits, batch_keep)
        for name, sae in saes.items():
            outputs: list = []
            logits = run_patched(model, batch, hook_name, sae_replacement(sae, use_error_term, record=outputs), batch_keep)
            accumulators[name].patching.add("sae", batch, logits, clean_logits, batch_keep)
            accumulators[name].update(x, outputs[0], batch_keep)

    extra = {"dense_threshold": dense_threshold, "excluded_token_ids": excluded, "n_contexts": int(tokens.shape[0]),
             "context_size": int(tokens.shape[1])}
    return {
        name: _result(saes[name], model, hook_name, acc, baselines, use_error_term, (run_dirs or {}).get(name), extra)
        for name, acc in accumulators.items()
    }


def _result(
    sae: Any, model: Any, hook_name: str, acc: _SAEAccumulators, baselines: PatchingMetrics, use_error_term: bool,
    run_dir: str | Path | None, extra: dict[str, Any],
) -> EvalResult:
    r, p = acc.recon.result(), acc.patching.result(baselines)
    routing = acc.experts.result() if acc.experts is not None else None
    dead = eval_dead_latents(r.n_unseen, sae.d_sae, r.l0, r.n_tokens)
    if dead is None and run_dir is not None:
        dead = training_dead_latents(run_dir, r.l0)
    return EvalResult(
        model_name=str(getattr(getattr(model, "cfg", None), "model_name", "") or getattr(sae.cfg, "model_name", "")),
        hook_name=hook_name,
        architecture=getattr(sae, "architecture", type(sae).__name__),
        d_sae=sae.d_sae,
        n_tokens=r.n_tokens,
        mse=r.mse,
        nmse=r.nmse,
        fve=r.fve,
        explained_variance_saelens=r.explained_variance_saelens,
        cosine=r.cosine,
        l2_ratio=r.l2_ratio,
        l0=r.l0,
        unseen_fraction=r.unseen_fraction,
        n_unseen=r.n_unseen,
        unseen_floor=r.unseen_floor,
        dead_fraction=dead.fraction if dead else None,
        n_dead=dead.n_dead if dead else None,
        dead_source=dead.source if dead else None,
        dead_window_tokens=dead.window_tokens if dead else None,
        dense_fraction=r.dense_fraction,
        ce_clean=p.ce_clean,
        ce_sae=p.ce_sae,
        ce_zero=p.ce_zero,
        ce_mean=p.ce_mean,
        delta_ce=p.delta_ce,
        loss_recovered_zero=p.loss_recovered_zero,
        loss_recovered_mean=p.loss_recovered_mean,
        kl=p.kl,
        kl_zero=p.kl_zero,
        kl_mean=p.kl_mean,
        kl_score=p.kl_score,
        use_error_term=use_error_term,
        expert_load=routing.load if routing else None,
        router_entropy=routing.router_entropy if routing else None,
        balance_loss=routing.balance_loss if routing else None,
        extra={**extra, "ce_tokens": p.n_tokens},
    )
