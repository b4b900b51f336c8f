"""The optimiser of a training run, chosen by name with ``TrainConfig.optimizer``.

``OPTIMIZERS`` maps each name to a builder ``(params, cfg, lr) -> torch.optim.Optimizer``;
another optimiser (a sparse or row-wise one, say) is one more builder here. The trainer
needs nothing else of it: it sets ``lr`` on every param group before each step (the
schedule), and checkpoints hold ``state_dict()``, which every ``torch.optim.Optimizer`` has.

What it leaves out: the learning-rate schedule (``TrainConfig.lr_at``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import TrainConfig

Builder = Callable[[Iterable[nn.Parameter], "TrainConfig", float], torch.optim.Optimizer]


def adam(params: Iterable[nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """The paper's Adam, with ``cfg.adam_betas`` and ``cfg.adam_eps``."""
    # The fused kernel: one pass over each parameter instead of several elementwise ops;
    # on CPU it measured ~5x faster for 2 x 2^25 parameters (benchmarks/README.md).
    return torch.optim.Adam(params, lr=lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=True)


class SignSGD(torch.optim.Optimizer):
    """``p -= lr * sign(grad)``: no state, so no memory beyond the parameters (sparsify's choice)."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])
        return loss


def sign_sgd(params: Iterable[nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """``SignSGD``; it has no settings beyond the learning rate."""
    return SignSGD(params, lr=lr)


OPTIMIZERS: dict[str, Builder] = {"adam": adam, "signsgd": sign_sgd}


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """The optimiser ``cfg.optimizer`` names, over ``params``, starting at ``lr``."""
    return OPTIMIZERS[cfg.optimizer](params, cfg, lr)
