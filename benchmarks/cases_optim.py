"""Optimiser cases: every pass the trainer makes over the parameters after ``backward``, and
the whole update, with the decoder-gradient projection on blocks of rows (as the model
does it) and on the whole matrix (as it did before).

Records ``optimiser_<pass>``, each one call as the trainer makes it on one process:
``decoder_parallel_grad_removal`` (``remove_decoder_parallel_grad_``), ``grad_clip_norm``
(``get_total_norm`` of every gradient), ``grad_clip_scale`` (the multiply
``clip_grad_norm_`` makes every step, by 1 when the norm is within the limit), ``adam``
(torch's fused Adam over every parameter) and ``decoder_renormalise``
(``normalize_decoder_``); then ``optimiser_update``, the four in a row (projection,
``clip_grad_norm_`` without clipping, Adam, renormalisation). The projection and the update
come in two variants: ``blocked`` (``models.base.DECODER_BLOCK_BYTES``) and
``whole_matrix`` (one block). On the Switch SAE of the largest expert count, every
gradient random; the two projections are compared before timing.

What it leaves out: the forward and backward passes (``cases_train.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from switch_sae.models import base
from switch_sae.training import TrainConfig
from switch_sae.training.optim import make_optimizer
from .cases_train import switch_model
from .measure import check_close, peak_memory, time_calls

NO_CLIP = float("inf")


@contextlib.contextmanager
def whole_matrix() -> Iterator[None]:
    """Project the decoder gradient in one block, as before blocking."""
    blocked = base.DECODER_BLOCK_BYTES
    base.DECODER_BLOCK_BYTES = 1 << 62
    try:
        yield
    finally:
        base.DECODER_BLOCK_BYTES = blocked


def optimiser_setup(spec: dict):
    n_experts = max(spec["sweep"])
    torch.manual_seed(spec["seed"])
    model = switch_model(spec["d_in"], spec["d_sae"], n_experts, spec["k"])
    optimizer = make_optimizer(model.parameters(), TrainConfig(total_steps=1), lr=1e-4)
    g = torch.Generator().manual_seed(spec["seed"])
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-3
    return model, optimizer, n_experts


def validate_blocks(model) -> dict:
    grad = model.W_dec.grad.clone()
    with whole_matrix():
        model.remove_decoder_parallel_grad_()
    want, model.W_dec.grad = model.W_dec.grad, grad
    model.remove_decoder_parallel_grad_()
    return {"against": "the projection on the whole matrix",
            "max_abs_err": check_close("projected decoder gradient", model.W_dec.grad, want)}


def optimiser_records(spec: dict, timing: dict) -> list[dict]:
    model, optimizer, n_experts = optimiser_setup(spec)
    grads = [p.grad for p in model.parameters()]
    one = torch.ones(())

    def update() -> None:
        model.remove_decoder_parallel_grad_()
        torch.nn.utils.clip_grad_norm_(model.parameters(), NO_CLIP)
        optimizer.step()
        model.normalize_decoder_()

    passes = {
        "decoder_parallel_grad_removal": model.remove_decoder_parallel_grad_,
        "grad_clip_norm": lambda: torch.nn.utils.get_total_norm(grads),
        "grad_clip_scale": lambda: torch._foreach_mul_(grads, one),
        "adam": optimizer.step,
        "decoder_renormalise": model.normalize_decoder_,
        "update": update,
    }
    validation = validate_blocks(model)
    base_fields = {"n_experts": n_experts, "d_expert": spec["d_sae"] // n_experts, "validation": validation}
    records = []
    for variant, context in (("blocked", contextlib.nullcontext), ("whole_matrix", whole_matrix)):
        for name, fn in passes.items():
            if variant == "whole_matrix" and name not in ("decoder_parallel_grad_removal", "update"):
                continue  # no projection in them: the same calls as blocked
            with context():
                records.append({"name": f"optimiser_{name}", "variant": variant, **base_fields,
                                **time_calls(fn, **timing), **peak_memory(fn)})
    return records
