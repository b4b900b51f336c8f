"""Dead latents, told apart from latents a small sample simply did not reach.

A latent that never fired on ``n`` eval tokens is *unseen*. That is not the same as *dead*:
if each of ``d_sae`` latents fires with the same probability ``L0 / d_sae`` per token (a
perfectly healthy SAE), the expected unseen fraction is

    floor = (1 - L0 / d_sae) ** n

which for 1,024 tokens, k = 32 and 32,768 latents is still 37%. So the evaluation reports

- ``unseen_fraction`` always, with ``unseen_floor`` (the formula above) beside it;
- ``dead_fraction`` only from enough tokens: at least ``dead_min_tokens = 10 d_sae / L0``
  eval tokens, where the floor is below e^-10; otherwise from the training run's own
  dead-latent tracker (tokens since each latent last fired, kept in every checkpoint) when
  it saw that many tokens; otherwise not at all (None).

What it leaves out: counting fires (``metrics``) and the training-time tracker itself
(``switch_sae.training.dead``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from ..training.checkpoint import checkpoints

TOKENS_PER_LATENT = 10
"""Expected fires per latent before a latent that never fired counts as dead (floor ~ e^-10)."""
TRACKER_KEY = "dead.tokens_since_fired"  # the trainer's tensor in each checkpoint's trainer.safetensors


def unseen_floor(l0: float, d_sae: int, n_tokens: int) -> float:
    """Expected fraction of latents a healthy SAE (each latent fires with probability
    ``l0 / d_sae`` per token) leaves unseen on ``n_tokens`` tokens: ``(1 - l0/d_sae)^n``."""
    p = min(max(l0 / d_sae, 0.0), 1.0)
    return (1.0 - p) ** n_tokens


def dead_min_tokens(l0: float, d_sae: int) -> int | None:
    """Tokens needed before never firing means dead: ``10 d_sae / l0`` (10 expected fires);
    None when ``l0`` is 0 (nothing fires, so no sample size tells dead from unlucky)."""
    return math.ceil(TOKENS_PER_LATENT * d_sae / l0) if l0 > 0 else None


@dataclass
class DeadLatents:
    """A dead-latent count and where it came from."""

    n_dead: int
    d_sae: int
    source: str
    """'eval' (never fired on enough eval tokens) or 'training' (the run's tracker)."""
    window_tokens: int
    """A latent is dead when silent over this many tokens."""

    @property
    def fraction(self) -> float:
        return self.n_dead / self.d_sae


def training_dead_latents(run_dir: str | Path, l0: float) -> DeadLatents | None:
    """Dead latents by the training tracker in ``run_dir/checkpoints`` (newest checkpoint):
    latents silent for the last ``dead_min_tokens(l0, d_sae)`` training tokens. None when the
    run has no checkpoint or trained on fewer tokens than that window."""
    found = checkpoints(Path(run_dir) / "checkpoints")
    if not found:
        return None
    newest = found[-1]
    since_fired = load_file(str(newest / "trainer.safetensors"))[TRACKER_KEY]  # [d_sae]
    tokens = int(json.loads((newest / "trainer.json").read_text())["tokens"])
    d_sae = since_fired.numel()
    window = dead_min_tokens(l0, d_sae)
    if window is None or tokens < window:
        return None
    return DeadLatents(n_dead=int((since_fired >= window).sum()), d_sae=d_sae, source="training", window_tokens=window)


def eval_dead_latents(n_unseen: int, d_sae: int, l0: float, n_tokens: int) -> DeadLatents | None:
    """The unseen latents as dead latents, when ``n_tokens`` reaches ``dead_min_tokens``; else None."""
    window = dead_min_tokens(l0, d_sae)
    if window is None or n_tokens < window:
        return None
    return DeadLatents(n_dead=n_unseen, d_sae=d_sae, source="eval", window_tokens=window)
