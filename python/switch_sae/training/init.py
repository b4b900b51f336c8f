"""Data-dependent initialisation: biases at the geometric median of the first batch.

The paper (appendix A) and the reference code start the pre-bias ``b_dec`` and the
router's pre-bias ``b_router`` at the geometric median of a batch: a robust centre, so the
encoder sees centred inputs from step one and outliers do not drag the start point.

What it leaves out: the parallel encoder/decoder start, which the models do themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.base import SAE


def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
    """The point minimising the sum of Euclidean distances to ``points [batch, d_in]``.

    Weiszfeld's algorithm: start at the mean, repeatedly take the mean weighted by
    1 / distance, stop when the step is shorter than ``tol`` or after ``max_iter`` steps.
    Computed in float64 so ``tol`` means the same for every input dtype.
    """
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError(f"points must have shape [batch, d_in] with batch >= 1, got {tuple(points.shape)}")
    p = points.detach().to(torch.float64)
    guess = p.mean(0)  # [d_in]
    for _ in range(max_iter):
        # a point sitting on the guess would get infinite weight; clamp its distance instead
        weights = 1.0 / (p - guess).norm(dim=-1).clamp_min(1e-12)  # [batch]
        new = (weights.unsqueeze(-1) * p).sum(0) / weights.sum()
        step = (new - guess).norm()
        guess = new
        if step < tol:
            break
    return guess.to(points.dtype)


@torch.no_grad()
def init_biases_from_batch_(model: SAE, x: Tensor) -> None:
    """Set ``b_dec`` (and ``b_router`` when the model routes) to the geometric median of x."""
    median = geometric_median(x.reshape(-1, model.d_in))
    for name in ("b_dec", "b_router"):
        bias = getattr(model, name, None)
        if bias is not None:
            bias.copy_(median.to(bias.dtype))
