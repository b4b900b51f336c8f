"""Kernel-level cases: the routed encoder GEMM limit, the machine's GEMM rate, and each
custom op against its reference twin.

* ``routed_gemm_limit``: ``torch.mm`` of ``[batch, d_in] x [d_in, d_expert]``, the only
  dense work a routed training step cannot avoid (``2 * batch * d_in * d_expert`` FLOPs).
* ``gemm_peak``: a square ``torch.mm`` (the machine's GEMM rate in GFLOP/s).
* ``op_<name>``: ``ops.<name>`` (``variant="switch_sae"``, the compiled kernel when the
  extension is loaded) and ``reference.<name>`` (``variant="reference"``) on the inputs a
  real step at these shapes feeds them; the outputs are compared before timing.

What it leaves out: the full training step (``cases_train.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from switch_sae import ops, reference
from .cases_train import switch_model
from .measure import ValidationError, check_close, peak_memory, time_calls

OP_NAMES = ("dispatch", "encode_topk", "decode", "decode_backward", "encode_backward")


def gemm_record(a: Tensor, b: Tensor, timing: dict) -> dict:
    """Validate ``a @ b`` against float64, time it, and report GFLOP/s."""
    want = a.double() @ b.double()
    err = check_close("torch.mm", torch.mm(a, b), want, rtol=1e-4, atol=1e-4)
    stats = time_calls(lambda: torch.mm(a, b), **timing)
    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    return {**stats, **peak_memory(lambda: torch.mm(a, b)), "flops": flops,
            "gflops": flops / stats["median_ms"] / 1e6,
            "validation": {"against": "float64 matmul", "max_abs_err": err}}


def gemm_records(spec: dict, timing: dict) -> list[dict]:
    """``routed_gemm_limit`` per expert count, then ``gemm_peak``."""
    g = torch.Generator().manual_seed(spec["seed"])
    x = torch.randn(spec["batch"], spec["d_in"], generator=g)  # [batch, d_in]
    records = []
    for n_experts in spec["sweep"]:
        d_expert = spec["d_sae"] // n_experts
        W = torch.randn(d_expert, spec["d_in"], generator=g)  # [d_expert, d_in], the layout of W_enc[e]
        rec = gemm_record(x, W.T, timing)
        records.append({"name": "routed_gemm_limit", "n_experts": n_experts, "d_expert": d_expert, **rec})
    n = spec["gemm_peak_size"]
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    records.append({"name": "gemm_peak", "variant": f"{n}x{n}x{n}", "n_experts": None, **gemm_record(a, b, timing)})
    records.append(copy_record(spec["d_sae"] * spec["d_in"], timing))
    records.append(inplace_record(spec["d_sae"] * spec["d_in"], timing))
    return records


def copy_record(numel: int, timing: dict) -> dict:
    """``memory_bandwidth``: GB/s of copying one float32 tensor of a parameter's size, the
    bound of the memory-bound parts of a step (Adam, sparse gathers, gradient writes)."""
    src, dst = torch.randn(numel), torch.empty(numel)
    dst.copy_(src)
    if not torch.equal(dst, src):
        raise ValidationError("memory_bandwidth: copy_ did not reproduce its source")
    return bandwidth_record("memory_bandwidth", "copy_", lambda: dst.copy_(src), src, timing, "torch.equal with the source")


def inplace_record(numel: int, timing: dict) -> dict:
    """``memory_bandwidth_inplace``: GB/s of ``a += b`` over two parameter-sized tensors (read
    a and b, write a). A copy's destination is read into cache before it is written
    (write-allocate), a third transfer its GB/s does not count; an in-place update such as
    Adam's pays none, so it can move its counted bytes faster than ``memory_bandwidth``."""
    a, b = torch.zeros(numel), torch.ones(numel)
    a.add_(b)
    if not torch.equal(a, b):
        raise ValidationError("memory_bandwidth_inplace: add_ gave a wrong sum")
    return bandwidth_record("memory_bandwidth_inplace", "add_", lambda: a.add_(b), a, timing, "torch.equal with 0 + 1",
                            streams=3)


def bandwidth_record(name: str, op: str, fn: Callable[[], object], t: Tensor, timing: dict, against: str,
                     streams: int = 2) -> dict:
    """GB/s of ``fn``, which reads or writes ``streams`` tensors like ``t`` once each."""
    stats = time_calls(fn, **timing)
    moved = streams * t.numel() * t.element_size()
    return {"name": name, "variant": f"{op} of {t.numel() * t.element_size() / 2**20:.3g} MiB", "n_experts": None,
            **stats, **peak_memory(fn), "bytes": moved, "gb_per_s": moved / stats["median_ms"] / 1e6,
            "validation": {"against": against}}


def op_inputs(spec: dict, n_experts: int) -> dict[str, tuple]:
    """Arguments of every op as one training step at these shapes produces them."""
    g = torch.Generator().manual_seed(spec["seed"])
    model = switch_model(spec["d_in"], spec["d_sae"], n_experts, spec["k"])
    k = spec["k"]
    x = torch.randn(spec["batch"], spec["d_in"], generator=g)  # [batch, d_in]
    with torch.no_grad():
        _, _, experts = model.route(x)  # [batch, 1]
        W_enc, W_dec = model.encoder_weight().detach(), model.W_dec_flat.detach()
        b_dec = model.b_dec.detach()
        order, offsets = reference.dispatch(experts.reshape(-1), n_experts)
        values, indices = reference.encode_topk(x, W_enc, None, b_dec, order, offsets, 1, k, model.cfg.tile_rows)
    grad_out = torch.randn(spec["batch"], spec["d_in"], generator=g)  # [batch, d_in]
    grad_values = torch.randn(spec["batch"], k, generator=g)  # [batch, k]
    return {
        "dispatch": (experts.reshape(-1), n_experts),
        "encode_topk": (x, W_enc, None, b_dec, order, offsets, 1, k, model.cfg.tile_rows),
        "decode": (values, indices, W_dec),
        "decode_backward": (grad_out, values, indices, W_dec),
        "encode_backward": (grad_values, values, indices, x, W_enc, b_dec, 1),
    }


def as_tuple(out: Tensor | tuple) -> tuple[Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def validate_op(name: str, fn: Callable, args: tuple) -> dict:
    """Compare every output of ``fn(*args)`` with ``reference.<name>(*args)``."""
    if name == "encode_topk":
        return validate_encode_topk(fn, args)
    got, want = as_tuple(fn(*args)), as_tuple(getattr(reference, name)(*args))
    if len(got) != len(want):
        raise ValidationError(f"{name}: {len(got)} outputs, the reference has {len(want)}")
    errors = [check_close(f"{name} output {i}", a, b) for i, (a, b) in enumerate(zip(got, want))]
    return {"against": f"reference.{name}", "max_abs_err": max(errors)}


def validate_encode_topk(fn: Callable, args: tuple, chunk_rows: int = 512) -> dict:
    """The codes' values against the reference's; each index by what it selects.

    The kernel's GEMM and the reference's round differently, so features whose
    pre-activations tie to float32 precision may come in another order, or at the k-th
    place another of the tied features may be chosen: comparing ids with the reference's
    would fail on such rows. Instead each chosen feature must belong to its pair's expert
    and have (in float64) the value reported for it, and the values must match the
    reference's, so the selection is a top k up to float32 ties.
    """
    x, W_enc, b_enc, b_dec, order, offsets, n_active, k, _ = args
    values, indices = fn(*args)  # [rows, k] each
    ref_values, _ = reference.encode_topk(*args)
    err = check_close("encode_topk values", values, ref_values)
    n_experts, d_expert, d_in = W_enc.shape
    expert_of_pair = torch.empty_like(order)  # [rows]
    expert_of_pair[order] = torch.repeat_interleave(torch.arange(n_experts), offsets.diff())
    if not torch.equal(indices // d_expert, expert_of_pair[:, None].expand_as(indices)):
        raise ValidationError("encode_topk: a chosen feature is not in its pair's expert")
    W_flat = W_enc.reshape(-1, d_in).double()  # [d_sae, d_in]
    b_flat = b_enc.reshape(-1).double() if b_enc is not None else None  # [d_sae]
    x_centered = (x - b_dec).double()  # [batch, d_in]
    for start in range(0, len(values), chunk_rows):
        idx = indices[start : start + chunk_rows]  # [chunk, k]
        tokens = torch.arange(start, start + len(idx)) // n_active  # [chunk]
        pre = torch.einsum("rd,rkd->rk", x_centered[tokens], W_flat[idx])  # [chunk, k]
        if b_flat is not None:
            pre = pre + b_flat[idx]
        err = max(err, check_close("encode_topk: pre-activations of the chosen features",
                                   values[start : start + chunk_rows], pre.relu()))
    return {"against": "reference.encode_topk values; float64 pre-activations of the chosen ids",
            "max_abs_err": err}


def op_records(spec: dict, timing: dict) -> list[dict]:
    """``op_<name>`` records (ours and reference) for every op at every expert count."""
    records = []
    for n_experts in spec["sweep"]:
        inputs = op_inputs(spec, n_experts)
        for name in OP_NAMES:
            args = inputs[name]
            for variant, fn in (("switch_sae", getattr(ops, name)), ("reference", getattr(reference, name))):
                validation = (validate_op(name, fn, args) if variant == "switch_sae"
                              else {"against": "itself (it is the reference)"})
                stats = time_calls(lambda: fn(*args), **timing)
                records.append({"name": f"op_{name}", "variant": variant, "n_experts": n_experts,
                                "d_expert": spec["d_sae"] // n_experts, **stats,
                                **peak_memory(lambda: fn(*args)), "validation": validation,
                                "profile_ms": profile_call(lambda: fn(*args))})
    return records


def profile_call(fn: Callable[[], object], top: int = 4) -> dict[str, float]:
    """Self CPU time (ms) of the ``top`` costliest ATen/custom ops of one call of ``fn``:
    shows, e.g., how encode_topk splits between its GEMMs, its TopK and its own loops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {e.key: e.self_cpu_time_total / 1e3 for e in events[:top]}
