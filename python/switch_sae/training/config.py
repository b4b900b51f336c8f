"""``TrainConfig``: every knob of the training recipe, with the paper's defaults.

What it leaves out: the model's shape (its own config) and the loop (``trainer.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..utils.checks import check_int_fields, check_number, check_number_fields
from .optim import OPTIMIZERS


@dataclass
class TrainConfig:
    """How to train an SAE: the optimiser, schedule, data handling and bookkeeping.

    Defaults follow the Switch SAE paper's recipe, with inputs normalised and Gao et al.'s
    AuxK. The loss itself belongs to the model: each architecture's config carries its own
    coefficients (``SwitchSAEConfig.lb_coefficient``, ``auxk_coefficient`` and ``k_aux`` on
    the TopK family, ``l1_coefficient`` on ReLU/Gated, ``l0_coefficient`` on JumpReLU), each
    defined relative to the reconstruction loss so that it is independent of the data's scale.
    """

    total_steps: int
    """Optimiser steps in the whole run; the lr schedule is laid out over it."""
    lr: float | None = None
    """Peak learning rate; None means 2e-4 / sqrt(width / 2^14), the paper's scaling law, with width the model's SAE.encoder_width (d_sae for a dense dictionary; n_active * d_expert for a Switch SAE, each of whose experts is a TopK SAE of width d_expert)."""
    optimizer: str = "adam"
    """The optimiser, a name in training.optim.OPTIMIZERS: 'adam' (the paper's, with adam_betas and adam_eps) or 'signsgd' (steps by lr * sign(grad), as sparsify does; the default lr law was measured with Adam)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's (beta1, beta2)."""
    adam_eps: float = 1e-8
    """Adam's epsilon."""
    warmup_steps: int = 0
    """Steps of linear lr warm-up from 0 (the paper uses none)."""
    decay_fraction: float = 0.2
    """Final fraction of the steps over which the lr falls linearly to 0."""
    grad_clip: float = 1.0
    """Maximum global gradient norm; 0 turns clipping off."""
    dead_after_tokens: int | None = None
    """A latent that has not fired for this many tokens counts as dead (and AuxK trains it); None scales with the run: a tenth of its tokens, at most 10M (Gao et al.'s value at full scale)."""
    init_geometric_median: bool = True
    """Start b_dec and b_router at the geometric median of the first batch."""
    normalize_inputs: bool = True
    """Train on inputs scaled so that E||x||^2 = d_in (the scale is estimated on the first batch), so that the lr and every loss coefficient mean the same thing whatever the activations' units. The scale is folded into the model when fit() returns and into every saved copy: a trained SAE always takes raw activations."""
    autocast: str | None = None
    """'bfloat16' runs forward and losses under torch.autocast (no GradScaler needed); None: off."""
    seed: int = 0
    """Seed of torch's RNG at the start of training."""
    run_dir: str | None = None
    """Folder for metrics.jsonl and checkpoints/; None keeps nothing on disk."""
    checkpoint_every: int = 0
    """Write a checkpoint every this many steps (0: only at the end and on Ctrl-C). Needs run_dir."""
    keep_checkpoints: int = 2
    """How many most recent checkpoints to keep."""
    resume: bool = False
    """Continue from the newest checkpoint in run_dir (starts fresh if there is none)."""
    log_every: int = 1
    """Write metrics every this many steps."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs wandb installed)."""
    tensorboard: bool = False
    """Also log to TensorBoard under run_dir/tensorboard (needs tensorboard installed)."""
    progress: bool = True
    """Show a tqdm progress bar in fit()."""
    parallel: str = "none"
    """Training across processes (launch with torchrun; gloo on CPU, NCCL on GPU): 'none', one process; 'data', every process holds the whole SAE and trains on its slice of each batch (any architecture); 'expert', each process also holds n_experts / W of a Switch SAE's experts and tokens travel to them. batch_size stays the global batch; the result equals one process's training on the same global batches."""
    parallel_timeout_s: float = 600.0
    """Seconds a process waits in a collective before failing: a crashed peer stops the others with an error within this time rather than hanging them."""

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)  # JSON round trips turn it into a list
        check_int_fields(self, "total_steps", "log_every", "keep_checkpoints")
        check_int_fields(self, "warmup_steps", "checkpoint_every", "seed", minimum=0)
        check_int_fields(self, "dead_after_tokens", minimum=0, optional=True)
        check_number_fields(self, "adam_eps", "grad_clip")
        check_number("parallel_timeout_s", self.parallel_timeout_s, positive=True)
        if self.parallel not in ("none", "data", "expert"):
            raise ValueError(f"parallel must be 'none', 'data' or 'expert', got {self.parallel!r}")
        if self.lr is not None:
            check_number("lr", self.lr, positive=True)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction!r}")
        if self.warmup_steps + round(self.decay_fraction * self.total_steps) > self.total_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} overlaps the final decay of "
                f"{self.decay_fraction:.0%} of total_steps={self.total_steps}; shorten one of them"
            )
        if self.autocast not in (None, "bfloat16"):
            raise ValueError(f"autocast must be None or 'bfloat16', got {self.autocast!r}")
        if (self.checkpoint_every or self.resume) and self.run_dir is None:
            raise ValueError("checkpoint_every and resume need run_dir: say where checkpoints live")

    def resolved_dead_after_tokens(self, batch_size: int) -> int:
        """``dead_after_tokens``, or a tenth of the run's tokens capped at 10M when unset."""
        if self.dead_after_tokens is not None:
            return self.dead_after_tokens
        return min(10_000_000, max(1, self.total_steps * batch_size // 10))

    def peak_lr(self, width: float) -> float:
        """The configured lr, or the paper's ``2e-4 / sqrt(width / 2^14)`` (see ``lr``)."""
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(width / 2**14)

    def lr_at(self, step: int, width: float) -> float:
        """Learning rate of optimiser step ``step`` (0-based): warm-up, constant, linear decay to 0."""
        peak = self.peak_lr(width)
        if step < self.warmup_steps:
            return peak * (step + 1) / self.warmup_steps
        decay_steps = round(self.decay_fraction * self.total_steps)
        decay_start = self.total_steps - decay_steps
        if decay_steps and step >= decay_start:
            return peak * max(self.total_steps - step, 0) / decay_steps
        return peak

