"""Loss recovered: splice an SAE's reconstruction into the model and measure the damage.

At the hook, the model's activation is replaced (``run_with_hooks``) by

- the SAE reconstruction ``x_hat`` (``sae_replacement``), optionally plus the detached
  error ``x - x_hat`` (``use_error_term``: the output is then exactly the clean one, and
  gradients and feature edits flow through the SAE, as in SAELens);
- zeros (zero ablation), or the mean activation over the eval set (mean ablation).

From the logits, per token: the next-token cross-entropy and ``KL(clean || patched)``
(summed over the vocabulary). Fraction of loss recovered against a baseline ``b``:
``(CE_b - CE_sae) / (CE_b - CE_clean)`` (1 = as good as the clean model, 0 = as bad as the
ablation); the paper reports it against zero ablation, mean ablation is the stronger one.

``keep [batch, pos]`` masks excluded positions (BOS, padding, separators): there the
activation is left as it was, the token is not a CE target, and its KL is not counted.
Means are over kept tokens (per token, as SAELens does), not per batch.

What it leaves out: reconstruction metrics (``metrics``) and the eval loop (``evaluate``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ..activations.harvest import flatten_heads

Replacement = Callable[[Tensor], Tensor]  # [batch, pos, d_in] -> [batch, pos, d_in]


def keep_mask(tokens: Tensor, exclude_token_ids: Iterable[int] = ()) -> Tensor:
    """``[batch, pos]`` True where the token is not one of ``exclude_token_ids``."""
    keep = torch.ones_like(tokens, dtype=torch.bool)
    for token_id in set(exclude_token_ids):
        keep &= tokens != token_id
    return keep


def sae_replacement(sae: Any, use_error_term: bool = False, record: list | None = None) -> Replacement:
    """Replace ``x`` by the SAE reconstruction (``record`` collects each ``ForwardOutput``)."""

    param = next(iter(sae.parameters()), None)
    dtype = param.dtype if param is not None else None  # run the SAE in its own dtype

    def replace(x: Tensor) -> Tensor:
        output = sae(x.reshape(-1, x.shape[-1]).to(dtype or x.dtype))
        if record is not None:
            record.append(output)
        x_hat = output.x_hat.reshape(x.shape).to(x.dtype)
        return x_hat + (x - x_hat).detach() if use_error_term else x_hat

    return replace


def zero_replacement(x: Tensor) -> Tensor:
    return torch.zeros_like(x)


def mean_replacement(mean: Tensor) -> Replacement:
    """Replace every position by ``mean [d_in]``."""
    return lambda x: mean.to(x.device, x.dtype).expand_as(x)


def splice_hook(replace: Replacement, keep: Tensor | None = None) -> Callable[[Tensor, Any], Tensor]:
    """A TransformerLens hook applying ``replace`` to the (head-flattened) activation,
    leaving positions where ``keep [batch, pos]`` is False untouched."""

    def hook(act: Tensor, hook: Any = None) -> Tensor:
        flat = flatten_heads(act)  # [batch, pos, d_in]
        new = replace(flat)
        if keep is not None:
            new = torch.where(keep.to(act.device).unsqueeze(-1), new, flat)
        return new.reshape(act.shape)

    return hook


def run_patched(model: Any, tokens: Tensor, hook_name: str, replace: Replacement, keep: Tensor | None = None) -> Tensor:
    """``[batch, pos, d_vocab]`` logits with ``hook_name`` replaced."""
    return model.run_with_hooks(tokens, return_type="logits", fwd_hooks=[(hook_name, splice_hook(replace, keep))])


def token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """``[batch, pos - 1]`` cross-entropy of each next token."""
    log_probs = logits[:, :-1].float().log_softmax(-1)  # [batch, pos - 1, d_vocab]
    return -log_probs.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


def token_kl(clean_logits: Tensor, logits: Tensor) -> Tensor:
    """``[batch, pos]`` KL(clean || patched) of the next-token distributions."""
    clean = clean_logits.float().log_softmax(-1)
    patched = logits.float().log_softmax(-1)
    return (clean.exp() * (clean - patched)).sum(-1)


@dataclass
class PatchingResult:
    n_tokens: int
    """Kept CE targets the means are over."""
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_mean: float
    delta_ce: float
    """ce_sae - ce_clean."""
    loss_recovered_zero: float
    loss_recovered_mean: float
    kl: float
    """Mean per-token KL(clean || SAE-patched), nats."""
    kl_zero: float
    kl_mean: float
    kl_score: float
    """(kl_zero - kl) / kl_zero, SAELens's kl_div_score."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fraction_recovered(ce_baseline: float, ce_patched: float, ce_clean: float) -> float:
    gap = ce_baseline - ce_clean
    return (ce_baseline - ce_patched) / gap if gap != 0 else float("nan")


class PatchingMetrics:
    """Running per-token sums of CE and KL for the clean, SAE, zero and mean runs."""

    RUNS = ("clean", "sae", "zero", "mean")

    def __init__(self) -> None:
        self.ce = dict.fromkeys(self.RUNS, 0.0)
        self.kl = dict.fromkeys(self.RUNS[1:], 0.0)
        self.n_ce = 0
        self.n_kl = 0

    @torch.no_grad()
    def add(self, run: str, tokens: Tensor, logits: Tensor, clean_logits: Tensor, keep: Tensor | None = None) -> None:
        """Add one run's ``logits [batch, pos, d_vocab]`` (add each batch's "clean" run once too)."""
        if run not in self.RUNS:
            raise ValueError(f"run must be one of {self.RUNS}, got {run!r}")
        if keep is None:
            keep = torch.ones_like(tokens, dtype=torch.bool)
        target_keep = keep[:, 1:]  # [batch, pos - 1]: the predicted token is kept
        self.ce[run] += float(token_ce(logits, tokens)[target_keep].sum())
        if run == "clean":
            self.n_ce += int(target_keep.sum())
            self.n_kl += int(keep.sum())
        else:
            self.kl[run] += float(token_kl(clean_logits, logits)[keep].sum())

    def result(self, baselines: PatchingMetrics | None = None) -> PatchingResult:
        """The means; ``baselines`` supplies the clean, zero and mean runs when one accumulator
        collected them for several SAEs (this one then holds only its "sae" run)."""
        shared = baselines or self
        if shared.n_ce == 0:
            raise ValueError("no kept tokens were accumulated: every position was excluded or nothing was run")
        ce = {run: total / shared.n_ce for run, total in {**shared.ce, "sae": self.ce["sae"]}.items()}
        kl = {run: total / max(shared.n_kl, 1) for run, total in {**shared.kl, "sae": self.kl["sae"]}.items()}
        return PatchingResult(
            n_tokens=shared.n_ce,
            ce_clean=ce["clean"],
            ce_sae=ce["sae"],
            ce_zero=ce["zero"],
            ce_mean=ce["mean"],
            delta_ce=ce["sae"] - ce["clean"],
            loss_recovered_zero=fraction_recovered(ce["zero"], ce["sae"], ce["clean"]),
            loss_recovered_mean=fraction_recovered(ce["mean"], ce["sae"], ce["clean"]),
            kl=kl["sae"],
            kl_zero=kl["zero"],
            kl_mean=kl["mean"],
            kl_score=(kl["zero"] - kl["sae"]) / kl["zero"] if kl["zero"] != 0 else float("nan"),
        )
