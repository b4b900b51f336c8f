"""Reconstruction and sparsity metrics, accumulated over an eval set batch by batch.

Feed ``ReconstructionMetrics.update(x, output)`` every ``[batch, d_in]`` batch and its
``ForwardOutput``; ``result()`` returns plain floats. Only running sums are kept (plus one
fire count per latent), so the eval set can be as large as the model can run:

- ``mse``: mean over tokens of ``||x - x_hat||^2`` summed over d_in (the paper's MSE);
- ``nmse``: that divided by the mean squared distance of ``x`` to its mean (the error of
  always predicting the mean, as in Gao et al.); ``fve = 1 - nmse`` is the textbook fraction
  of variance explained, ``1 - sum_d Var(x_d - x_hat_d) / sum_d Var(x_d)`` when the error
  has zero mean;
- ``explained_variance_saelens``: SAELens's ``explained_variance`` (its evals and trainer),
  ``1 - E||x - x_hat||^2 / (E||x||^2 - (E_{token,d}[x_d^2])^2)``. It is *not* the textbook
  variance (the subtracted term is a squared mean square, not the squared mean), so only
  compare it with SAELens numbers;
- ``cosine``: mean over tokens of ``cos(x, x_hat)``; ``l2_ratio``: mean ``||x_hat|| / ||x||``;
- ``l0``: mean number of nonzero entries of the sparse code (``code.values``), or of the
  positive entries of a dense ``acts``; never the pre-TopK activations;
- ``unseen_fraction``: latents that never fire on any eval token, and ``unseen_floor``, the
  fraction a perfectly healthy SAE would leave unseen on as many tokens (``dead`` says when
  unseen may be called dead); ``dense_fraction``: latents that fire on more than
  ``dense_threshold`` of the tokens.

Router statistics of Switch SAEs (expert load, router entropy) live in ``experts``.

What it leaves out: running the model or the SAE, and loss recovered (``patching``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from .dead import unseen_floor


@dataclass
class ReconstructionResult:
    n_tokens: int
    mse: float
    nmse: float
    fve: float
    explained_variance_saelens: float
    cosine: float
    l2_ratio: float
    l0: float
    unseen_fraction: float
    """Latents that never fired on these tokens (not the same as dead: see ``evals.dead``)."""
    n_unseen: int
    unseen_floor: float
    """Expected unseen fraction of a healthy SAE with this L0 on this many tokens."""
    dense_fraction: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fired_latents(output: Any, d_sae: int) -> tuple[Tensor, Tensor]:
    """``(l0 [batch], fire_counts [d_sae])`` of one batch, from the code an SAE produced."""
    if output.code is not None:
        values, indices = output.code
        values = values.reshape(-1, values.shape[-1])  # [batch, k]
        active = values != 0
        counts = torch.bincount(indices.reshape(values.shape)[active], minlength=d_sae)
        return active.sum(-1), counts
    if output.acts is not None:
        active = output.acts.reshape(-1, d_sae) > 0  # [batch, d_sae]
        return active.sum(-1), active.sum(0)
    raise ValueError("the SAE output has neither a sparse code nor dense acts: cannot count active latents")


class ReconstructionMetrics:
    """Running sums for the metrics of the module docstring."""

    def __init__(self, d_in: int, d_sae: int, *, dense_threshold: float = 0.1) -> None:
        if not 0 < dense_threshold <= 1:
            raise ValueError(f"dense_threshold must be in (0, 1], got {dense_threshold!r}")
        self.d_in, self.d_sae, self.dense_threshold = d_in, d_sae, dense_threshold
        self.n = 0
        self.sq_err = 0.0  # sum over tokens of ||x - x_hat||^2
        self.sq_norm = 0.0  # sum over tokens of ||x||^2
        self.x_sum = torch.zeros(d_in, dtype=torch.float64)  # [d_in]
        self.cosine = 0.0
        self.l2_ratio = 0.0
        self.l0 = 0.0
        self.fires = torch.zeros(d_sae, dtype=torch.int64)  # [d_sae] tokens on which each latent fired

    @torch.no_grad()
    def update(self, x: Tensor, output: Any, mask: Tensor | None = None) -> None:
        """Add ``x [batch, d_in]`` and the SAE's ``output``; ``mask [batch]`` keeps some tokens."""
        x = x.reshape(-1, self.d_in).double()
        x_hat = output.x_hat.reshape(-1, self.d_in).double()
        if mask is not None:
            mask = mask.reshape(-1).bool()
            x, x_hat = x[mask], x_hat[mask]
            output = _masked_code(output, mask, self.d_sae)
        l0, fires = fired_latents(output, self.d_sae)
        norm, norm_hat = x.norm(dim=-1), x_hat.norm(dim=-1)
        self.n += x.shape[0]
        self.sq_err += float((x - x_hat).pow(2).sum())
        self.sq_norm += float(norm.pow(2).sum())
        self.x_sum += x.sum(0).cpu()
        self.cosine += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum())
        self.l2_ratio += float((norm_hat / norm.clamp_min(1e-30)).sum())
        self.l0 += float(l0.sum())
        self.fires += fires.cpu()

    def result(self) -> ReconstructionResult:
        if self.n == 0:
            raise ValueError("no tokens were accumulated: call update() with at least one batch first")
        n = self.n
        mse = self.sq_err / n
        mean = self.x_sum / n
        variance = self.sq_norm / n - float(mean.pow(2).sum())  # E||x - E[x]||^2
        mean_square = self.sq_norm / (n * self.d_in)  # E_{token,d}[x_d^2], as SAELens computes it
        nmse = mse / variance if variance > 0 else float("nan")
        unseen = int((self.fires == 0).sum())
        l0 = self.l0 / n
        return ReconstructionResult(
            n_tokens=n,
            mse=mse,
            nmse=nmse,
            fve=1.0 - nmse,
            explained_variance_saelens=1.0 - mse / (self.sq_norm / n - mean_square**2),
            cosine=self.cosine / n,
            l2_ratio=self.l2_ratio / n,
            l0=l0,
            unseen_fraction=unseen / self.d_sae,
            n_unseen=unseen,
            unseen_floor=unseen_floor(l0, self.d_sae, n),
            dense_fraction=float((self.fires > self.dense_threshold * n).sum()) / self.d_sae,
        )


def _masked_code(output: Any, mask: Tensor, d_sae: int) -> Any:
    """``output`` restricted to the tokens where ``mask [batch]`` is True (for fire counts)."""
    if output.code is not None:
        values, indices = output.code
        k = values.shape[-1]
        return output._replace(code=type(output.code)(values.reshape(-1, k)[mask], indices.reshape(-1, k)[mask]))
    return output._replace(acts=output.acts.reshape(-1, d_sae)[mask])
