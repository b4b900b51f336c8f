"""The JumpReLU SAE baseline (Rajamanoharan et al. 2024, "Jumping Ahead").

    pre   = W_enc (x - b_dec) + b_enc
    acts  = pre * 1[pre > theta],  theta = exp(log_threshold) > 0 per feature
    x_hat = acts @ W_dec + b_dec
    loss  = ||x - x_hat||^2 + l0_coefficient * sum_i 1[pre_i > theta_i]

The step has zero gradient almost everywhere, so theta learns through straight-through
estimators with a rectangle kernel of width ``bandwidth`` (the paper's eqs. 11-12):
d acts / d theta = -(theta / bandwidth) * 1[|pre - theta| < bandwidth / 2], and
d step / d theta = -(1 / bandwidth) * 1[|pre - theta| < bandwidth / 2].

Plain dense PyTorch: ``[batch, d_sae]`` activations (``ForwardOutput.acts``).

Training terms: reconstruction and ``l0``, the L0 penalty above with the straight-through
gradient for theta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..utils.checks import check_number, check_number_fields
from . import losses
from .base import ForwardOutput, register_architecture
from .baseline import DenseCodeSAE, DictionaryConfig


def _window(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """Rectangle kernel ``1[|pre - theta| < bandwidth / 2]`` as pre's dtype."""
    return ((pre - threshold).abs() < bandwidth / 2).to(pre.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """``pre * 1[pre > theta]`` with the straight-through gradient for theta."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        grad_pre = grad * (pre > threshold).to(grad.dtype)
        grad_threshold = -(threshold / ctx.bandwidth) * _window(pre, threshold, ctx.bandwidth) * grad
        return grad_pre, grad_threshold.sum(0), None


class StepFunction(torch.autograd.Function):
    """``1[pre > theta]`` with the straight-through gradient for theta (none for pre)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        grad_threshold = -(1.0 / ctx.bandwidth) * _window(pre, threshold, ctx.bandwidth) * grad
        return None, grad_threshold.sum(0), None


@dataclass(kw_only=True)
class JumpReLUSAEConfig(DictionaryConfig):
    """Shape, estimator options and L0 coefficient of a JumpReLU SAE."""

    threshold_init: float = 0.001
    """Initial threshold of every feature (the paper's value, for inputs normalised to E||x||^2 = d_in)."""
    bandwidth: float = 0.001
    """Width of the rectangle kernel of the straight-through estimators."""
    l0_coefficient: float = 0.1
    """Weight of the L0 penalty (active features per token) for inputs normalised to E||x||^2 = d_in (scaled with the inputs' mean square otherwise)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number_fields(self, "threshold_init", "bandwidth", positive=True)
        check_number("l0_coefficient", self.l0_coefficient)


@register_architecture
class JumpReLUSAE(DenseCodeSAE):
    """JumpReLU SAE: a learnt per-feature threshold, trained with an L0 penalty. Dense PyTorch."""

    architecture = "jumprelu"
    config_class = JumpReLUSAEConfig

    def __init__(self, cfg: JumpReLUSAEConfig) -> None:
        super().__init__(cfg)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **self.factory))  # [d_sae]
        # log-parametrised so theta stays positive under any optimiser step
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.threshold_init), **self.factory))
        self.setup_hooks()

    @property
    def threshold(self) -> Tensor:
        return torch.exp(self.log_threshold)  # [d_sae]

    def encode_batch(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """JumpReLU of the pre-activations; ``pre_acts`` for the L0 penalty."""
        pre = self.pre_acts(x) + self.b_enc  # [batch, d_sae]
        return JumpReLUFunction.apply(pre, self.threshold, self.cfg.bandwidth), {"pre_acts": pre}

    def training_terms(self, x: Tensor, out: ForwardOutput, dead: Tensor | None = None) -> dict[str, Tensor]:
        """Reconstruction and the L0 penalty (``l0``)."""
        terms = super().training_terms(x, out, dead)
        pre = out.aux["pre_acts"].float()  # [batch, d_sae]
        l0 = losses.token_mean(StepFunction.apply(pre, self.threshold.float(), self.cfg.bandwidth).sum(-1))
        terms["l0"] = self.cfg.l0_coefficient * losses.energy_unit(x) * l0
        return terms
