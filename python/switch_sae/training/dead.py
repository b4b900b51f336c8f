"""Dead-latent bookkeeping: tokens since each latent last fired, in a registered buffer.

Being a buffer of a small module, the counter travels with ``state_dict`` into checkpoints,
so a resumed run knows exactly which latents were dead (and AuxK behaves identically).

What it leaves out: what is done with dead latents (``auxk.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..models import losses
from ..models.base import ForwardOutput


def fired_latents(out: ForwardOutput, d_sae: int) -> Tensor:
    """``[d_sae]`` bool: latents with a nonzero activation on at least one token of the batch."""
    if out.code is not None:
        values, indices = out.code
        hits = indices.reshape(-1)[values.reshape(-1) != 0]
        return torch.bincount(hits, minlength=d_sae) > 0
    return (out.acts.reshape(-1, d_sae) != 0).any(0)


def l0(out: ForwardOutput) -> Tensor:
    """Mean nonzero activations per token, from the code actually used to decode."""
    active = out.code.values if out.code is not None else out.acts
    return losses.token_mean((active != 0).sum(-1).float())


class DeadLatentTracker(nn.Module):
    """Counts, per latent, tokens seen since it last fired."""

    def __init__(self, d_sae: int, dead_after_tokens: int, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.dead_after_tokens = dead_after_tokens
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.int64, device=device))

    def dead(self) -> Tensor:
        """``[d_sae]`` bool mask of latents silent for more than ``dead_after_tokens`` tokens."""
        return self.tokens_since_fired > self.dead_after_tokens

    @torch.no_grad()
    def update_(self, fired: Tensor, n_tokens: int) -> None:
        """Advance every counter by ``n_tokens`` and reset those of latents in ``fired``."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired.to(self.tokens_since_fired.device)] = 0
