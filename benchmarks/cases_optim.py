"""Optimiser cases: every pass the trainer makes over the parameters after ``backward``, and
the whole update op by op against the blocked one the trainer runs (``training/update.py``).

Records ``optimiser_<pass>`` (``variant="op_by_op"``), each one torch call as the trainer
made it before blocking: ``decoder_parallel_grad_removal`` (the model's
``remove_decoder_parallel_grad_``), ``grad_clip_norm`` (``get_total_norm`` of every
gradient), ``grad_clip_scale`` (the multiply ``clip_grad_norm_`` makes every step, by 1
when the norm is within the limit), ``adam`` (torch's fused Adam over every parameter) and
``decoder_renormalise`` (``normalize_decoder_``). Then ``optimiser_update``: the whole
update, ``variant="op_by_op"`` (``update_op_by_op_``) and ``"blocked"``
(``update_parameters_``), without clipping (``max_norm`` infinite), on the Switch SAE of the
largest expert count, every gradient random; and the blocked projection alone
(``optimiser_decoder_parallel_grad_removal``, ``variant="blocked"``, with each block's
gradient norm).

What it leaves out: the forward and backward passes (``cases_train.py``).
"""

from __future__ import annotations

import torch

from switch_sae.training import TrainConfig
from switch_sae.training.optim import make_optimizer
from switch_sae.training.update import project_decoder_grad_, update_op_by_op_, update_parameters_
from .cases_train import switch_model
from .measure import ValidationError, check_close, peak_memory, time_calls

NO_CLIP = float("inf")


def optimiser_setup(spec: dict):
    n_experts = max(spec["sweep"])
    torch.manual_seed(spec["seed"])  # the same weights at every call
    model = switch_model(spec["d_in"], spec["d_sae"], n_experts, spec["k"])
    optimizer = make_optimizer(model.parameters(), TrainConfig(total_steps=1), lr=1e-4)
    g = torch.Generator().manual_seed(spec["seed"])
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 1e-3
    return model, optimizer, n_experts


def validate_blocked(spec: dict) -> dict:
    """The blocked update against the op-by-op one, from the same state."""
    (a, opt_a, _), (b, opt_b, _) = optimiser_setup(spec), optimiser_setup(spec)
    update_parameters_(a, opt_a, NO_CLIP)
    update_op_by_op_(b, opt_b, NO_CLIP)
    errors = [check_close(f"parameter {name}", p, q) for (name, p), q in zip(a.named_parameters(), b.parameters())]
    return {"against": "update_op_by_op_", "max_abs_err": max(errors)}


def optimiser_records(spec: dict, timing: dict) -> list[dict]:
    model, optimizer, n_experts = optimiser_setup(spec)
    params = list(model.parameters())
    grads = [p.grad for p in params]
    one = torch.ones(())
    update_parameters_(model, optimizer, NO_CLIP)  # creates Adam's state before timing
    passes = {
        "decoder_parallel_grad_removal": model.remove_decoder_parallel_grad_,
        "grad_clip_norm": lambda: torch.nn.utils.get_total_norm(grads),
        "grad_clip_scale": lambda: torch._foreach_mul_(grads, one),
        "adam": optimizer.step,
        "decoder_renormalise": model.normalize_decoder_,
    }
    validation = validate_blocked(spec)
    if not torch.isfinite(model.W_dec).all():
        raise ValidationError("optimiser: the decoder is not finite after an update")
    base = {"n_experts": n_experts, "d_expert": spec["d_sae"] // n_experts}
    records = []
    for name, fn in passes.items():
        records.append({"name": f"optimiser_{name}", "variant": "op_by_op", **base, **time_calls(fn, **timing),
                        **peak_memory(fn), "validation": {"against": "none: a torch call timed as the trainer made it"}})
    blocked = {
        "decoder_parallel_grad_removal": lambda: project_decoder_grad_(model),  # with each block's norm
        "update": lambda: update_parameters_(model, optimizer, NO_CLIP),
    }
    for name, fn in blocked.items():
        records.append({"name": f"optimiser_{name}", "variant": "blocked", **base, **time_calls(fn, **timing),
                        **peak_memory(fn), "validation": validation})
    def op_by_op() -> None:
        update_op_by_op_(model, optimizer, NO_CLIP)

    records.append({"name": "optimiser_update", "variant": "op_by_op", **base, **time_calls(op_by_op, **timing),
                    **peak_memory(op_by_op), "validation": validation})
    return records
