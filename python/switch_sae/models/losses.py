"""Training losses as pure tensor functions, apart from any model.

Conventions: reconstruction errors are summed over ``d_in`` and averaged over tokens, as
in the paper (so MSE is on the scale of ``E||x||^2``, i.e. ``d_in`` for normalised inputs).
Everything is computed in float32 or wider, whatever the autocast or parameter dtype.

Several processes: under a distributed ``batch_scope`` (training split across processes)
every token average is this process's share of the global one and every data statistic
(total variance, energy, expert load) is global, so each term's shares sum to the term of
the whole batch; locally nothing changes.

Units: every auxiliary weight is relative to the batch's total variance (``weight_unit``),
so that ``loss / total_variance = FVU + sum_i coefficient_i * term_i`` and a coefficient
means the same thing whatever the scale of the activations (multiplying the data by a
constant multiplies every term by the same constant squared).

What it leaves out: which terms an architecture needs and their coefficients (each model's
``training_terms`` and config), and the dead-latent code (``auxk.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import batch_scope


def _wide(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def token_mean(t: Tensor) -> Tensor:
    """``t [batch, ...]`` averaged over the batch's tokens; under a distributed scope, this
    process's share ``t.sum(0) / n_tokens`` of the average over every process's tokens."""
    scope = batch_scope.current()
    if not scope.distributed:
        return t.mean(0)
    return t.sum(0) / scope.n_tokens(t.shape[0])


def mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """``mean_tokens ||x - x_hat||^2``; x, x_hat ``[batch, d_in]``."""
    return token_mean((_wide(x) - _wide(x_hat)).pow(2).sum(-1))


def total_variance(x: Tensor) -> Tensor:
    """``mean_tokens ||x - mean(x)||^2`` of ``x [batch, d_in]``: the MSE of predicting the mean
    (a statistic of the data: global, and detached, under a distributed scope)."""
    x = _wide(x)
    scope = batch_scope.current()
    if not scope.distributed:
        return (x - x.mean(0)).pow(2).sum(-1).mean()
    x = x.detach()
    n = scope.n_tokens(x.shape[0])
    mean = scope.sum(x.sum(0)) / n
    return scope.sum((x - mean).pow(2).sum()) / n


def weight_unit(x: Tensor) -> Tensor:
    """The unit of every auxiliary loss weight: ``total_variance(x)``, detached.

    Multiplying a normalised term (a balance statistic, an AuxK NMSE) by it puts the term on
    the same scale as the reconstruction loss, so its coefficient is a fraction of the FVU.
    """
    return total_variance(x.detach()).clamp_min(torch.finfo(torch.float32).tiny)


def energy_unit(x: Tensor) -> Tensor:
    """``mean_tokens ||x||^2 / d_in``, detached: 1 for inputs normalised to ``E||x||^2 = d_in``.

    The unit of the sparsity penalties: an L1 penalty is weighted by its square root (the
    activations scale with x) and an L0 penalty by it, so the usual coefficients of
    normalised inputs keep their meaning at any activation scale.
    """
    x = _wide(x.detach())
    scope = batch_scope.current()
    if not scope.distributed:
        return (x.pow(2).sum(-1).mean() / x.shape[-1]).clamp_min(torch.finfo(torch.float32).tiny)
    mean_square = scope.sum(x.pow(2).sum()) / scope.n_tokens(x.shape[0])
    return (mean_square / x.shape[-1]).clamp_min(torch.finfo(torch.float32).tiny)


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: ``mse / total_variance`` over the batch."""
    return mse(x, x_hat) / total_variance(x).clamp_min(torch.finfo(torch.float32).tiny)


def expert_load(experts: Tensor, n_experts: int) -> Tensor:
    """``f [n_experts]``: share of (token, expert) pairs sent to each expert (sums to 1).

    The one definition of f_i, shared by the balance loss and the evaluations: with
    ``n_active > 1`` every selected expert counts (a token sent to experts 0 and 3 adds half
    a token to each), which is the paper's top-1 fraction when ``n_active = 1``.

    Args:
        experts: ``[batch, n_active]`` int64.
    """
    counts = torch.bincount(experts.reshape(-1), minlength=n_experts)
    scope = batch_scope.current()
    if not scope.distributed:
        return counts.to(torch.float32) / experts.numel()
    counts = scope.sum(counts)  # every process's pairs
    return counts.to(torch.float32) / counts.sum()


def load_balancing(router_probs: Tensor, experts: Tensor) -> Tensor:
    """Switch Transformer balance loss ``n_experts * sum_i f_i P_i`` (1 when perfectly balanced).

    ``f_i`` (counts, no gradient) from ``expert_load``; ``P_i`` the mean router probability
    of expert i, through which the gradient flows. router_probs ``[batch, n_experts]``.
    """
    n_experts = router_probs.shape[-1]
    f = expert_load(experts, n_experts)
    P = token_mean(_wide(router_probs))  # [n_experts]
    return n_experts * (f * P).sum()


def router_p_max(router_probs: Tensor) -> Tensor:
    """Mean over tokens of the largest routing probability (1/n_experts = a flat router)."""
    return token_mean(_wide(router_probs).max(-1).values)


def router_entropy(router_probs: Tensor) -> Tensor:
    """Mean over tokens of the entropy (nats) of the routing distribution."""
    p = _wide(router_probs)
    return token_mean(-(p * torch.log(p.clamp_min(1e-30))).sum(-1))


def weighted_l1(acts: Tensor, W_dec: Tensor) -> Tensor:
    """``mean_tokens sum_i |acts_i| * ||W_dec[i]||``; acts ``[batch, d_sae]``, W_dec ``[d_sae, d_in]``."""
    return token_mean((_wide(acts).abs() * _wide(W_dec).norm(dim=-1)).sum(-1))


def auxk(residual: Tensor, dead_recon: Tensor, n_dead: int, k_aux: int) -> Tensor:
    """Gao et al.'s AuxK loss: how well the dead latents reconstruct what the live ones missed.

    ``min(n_dead / k_aux, 1) * ||e - e_hat||^2 / ||e - mean(e)||^2`` (tokens averaged), with
    ``e = residual [batch, d_in]`` the detached error ``x - x_hat`` and ``e_hat = dead_recon``
    the decoding of the top-k_aux dead latents (without ``b_dec``: e has no offset to learn).
    """
    if n_dead == 0:
        return dead_recon.new_zeros((), dtype=torch.float32)
    scale = min(n_dead / k_aux, 1.0)
    return scale * mse(residual, dead_recon) / total_variance(residual).clamp_min(torch.finfo(torch.float32).tiny)
