"""GPU tests of the CUDA kernels of the ``switch_sae`` ops; skipped without a CUDA GPU.

Same samples as tests/test_ops.py (imported from it, not copied), moved to the GPU.
Checked per op: outputs against the CPU kernels (same algorithm, so fp32 agrees to
rounding) and against ``switch_sae.reference``, bf16/fp16 against a float64 reference,
float64 ``gradcheck`` on the GPU, ``opcheck``, ``torch.compile(fullgraph=True)``,
bitwise determinism (also under ``torch.use_deterministic_algorithms``), no host
synchronisation where none is promised, both encoder GEMM paths, the CPU's error
messages for bad shapes and dtypes, and device-side asserts for bad indices.

What it leaves out: timing (benchmarks/), and anything testable without a GPU: the
build itself is checked by tests/test_cuda_build.py.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from switch_sae import ops, reference
from test_ops import (
    BF16_TOL,
    FP32_TOL,
    OP_NAMES,
    SHAPES,
    assert_op_ignores_autocast,
    assert_same_topk,
    assert_training_step_ignores_autocast,
    assert_valid_topk,
    in_float64,
    make_problem,
    opcheck_samples,
    random_code,
    routed_preactivations,
    separated_problem,
    tied_problem,
    wide_tied_problem,
)

HAS_GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")

OPS = torch.ops.switch_sae
REDUCED = [torch.bfloat16, torch.float16]


def to_cuda(value):
    """Tensors (also inside dicts, lists and tuples) copied to the GPU, keeping requires_grad."""
    if isinstance(value, torch.Tensor):
        moved = value.detach().cuda()
        return moved.requires_grad_(True) if value.requires_grad else moved
    if isinstance(value, dict):
        return {key: to_cuda(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cuda(v) for v in value)
    return value


def encode(p, tile_rows=None):
    order, offsets = OPS.dispatch(p["experts"], p["n_experts"])
    tile = p["tile_rows"] if tile_rows is None else tile_rows
    return OPS.encode_topk(p["x"], p["W_enc"], p["b_enc"], p["b_dec"], order, offsets, p["n_active"], p["k"], tile)


def grouped_mm_runs(dtype) -> bool:
    """Whether encode_topk takes its at::_grouped_mm path here (see csrc/cuda/encode_topk.cu)."""
    return dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] in (9, 10)


@pytest.fixture(params=["grouped", "per_expert"])
def gemm_path(request, monkeypatch):
    """Runs a test with encode_topk's grouped GEMM path allowed, then with it disabled."""
    monkeypatch.setenv("SWITCH_SAE_DISABLE_GROUPED_MM", "1" if request.param == "per_expert" else "0")
    return request.param


@pytest.fixture(autouse=True)
def ieee_fp32():
    """Full-precision fp32 GEMMs, whatever the caller set, for the comparisons at fp32
    tolerance (TF32 keeps 10 mantissa bits: the feature-id checks, which look only at
    selections decided by a wide margin, would hold; the value tolerances would not)."""
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    yield
    torch.backends.cuda.matmul.fp32_precision = previous


def test_extension_has_cuda_kernels():
    assert ops.HAS_EXTENSION and ops.with_cuda(), (
        "a GPU is present but switch_sae was built without CUDA kernels: reinstall with nvcc on PATH"
    )


# ---------------------------------------------------------------- dispatch


class TestDispatchCuda:
    @pytest.mark.parametrize("name", list(SHAPES))
    def test_matches_cpu_kernel(self, name):
        p = make_problem(SHAPES[name], idle_expert=1 if SHAPES[name][2] > 2 else None)
        got = OPS.dispatch(p["experts"].cuda(), p["n_experts"])
        for g, w in zip(got, OPS.dispatch(p["experts"], p["n_experts"])):
            assert torch.equal(g.cpu(), w)

    # Many blocks, and more experts than the shared-memory histogram holds (8192).
    @pytest.mark.parametrize("rows,n_experts", [(100_000, 37), (50_000, 10_000)])
    def test_large_is_stable_and_matches_reference(self, rows, n_experts):
        experts = torch.randint(0, n_experts, (rows,), generator=torch.Generator().manual_seed(0))
        order, offsets = OPS.dispatch(experts.cuda(), n_experts)
        ref_order, ref_offsets = reference.dispatch(experts, n_experts)
        assert torch.equal(order.cpu(), ref_order)
        assert torch.equal(offsets.cpu(), ref_offsets)


# ---------------------------------------------------------------- encode_topk


class TestEncodeTopkCuda:
    @pytest.mark.parametrize("use_b_enc", [True, False])
    @pytest.mark.parametrize("name", list(SHAPES))
    def test_matches_cpu_kernel_fp32(self, name, use_b_enc):
        p = make_problem(SHAPES[name], b_enc=use_b_enc, idle_expert=0 if SHAPES[name][2] > 2 else None)
        values, indices = encode(to_cuda(p))
        ref_values, ref_indices = encode(p)
        assert_same_topk(values.cpu(), indices.cpu(), ref_values, ref_indices, routed_preactivations(p), FP32_TOL)

    @pytest.mark.parametrize("dtype", REDUCED)
    @pytest.mark.parametrize("use_b_enc", [True, False])
    @pytest.mark.parametrize("name", ["basic", "n_active=2", "d_expert=13,tiles", "one_expert"])
    def test_reduced_precision_selects_a_valid_topk(self, name, use_b_enc, dtype, gemm_path):
        # d_in = 12, 8, 9, 8: the grouped path needs d_in % 8 == 0, so both paths run.
        p = to_cuda(make_problem(SHAPES[name], dtype=dtype, b_enc=use_b_enc, idle_expert=1))
        values, indices = encode(p)
        assert values.dtype == dtype
        assert_valid_topk(p, values, indices)

    def test_grouped_and_per_expert_paths_agree(self, monkeypatch):
        if not grouped_mm_runs(torch.bfloat16):
            pytest.skip("the grouped GEMM path runs only for bf16 on compute capability 9.x/10.x")
        p = to_cuda(make_problem((300, 64, 6, 40, 8, 2, 128), dtype=torch.bfloat16, idle_expert=2))
        monkeypatch.setenv("SWITCH_SAE_DISABLE_GROUPED_MM", "0")
        grouped = encode(p)
        monkeypatch.setenv("SWITCH_SAE_DISABLE_GROUPED_MM", "1")
        per_expert = encode(p)
        torch.testing.assert_close(grouped[0], per_expert[0], **BF16_TOL)
        assert_valid_topk(p, *grouped)

    def test_float64(self):
        p = make_problem(SHAPES["n_active=2"], dtype=torch.float64, idle_expert=0)
        values, indices = encode(to_cuda(p))
        ref_values, ref_indices = encode(p)
        assert_same_topk(values.cpu(), indices.cpu(), ref_values, ref_indices, routed_preactivations(p), {})

    def test_autograd_matches_reference(self):
        p = to_cuda(make_problem(SHAPES["n_active=2"], idle_expert=2))
        order, offsets = OPS.dispatch(p["experts"], p["n_experts"])
        leaves = ["x", "W_enc", "b_enc", "b_dec"]
        weight = torch.randn(len(p["experts"]), p["k"], device="cuda")
        grads = []
        for fn in (ops.encode_topk, reference.encode_topk):
            q = {n: (t.detach().clone().requires_grad_(True) if n in leaves else t) for n, t in p.items()}
            values, _ = fn(q["x"], q["W_enc"], q["b_enc"], q["b_dec"], order, offsets, q["n_active"], q["k"], q["tile_rows"])
            (values * weight).sum().backward()
            grads.append([q[n].grad for n in leaves])
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, **FP32_TOL)

    def test_gradcheck_float64(self):
        p = to_cuda(separated_problem())
        order, offsets = OPS.dispatch(p["experts"], p["n_experts"])

        def fn(x, W_enc, b_enc, b_dec):
            return ops.encode_topk(x, W_enc, b_enc, b_dec, order, offsets, p["n_active"], p["k"], 2)[0]

        inputs = [p[n].detach().requires_grad_(True) for n in ("x", "W_enc", "b_enc", "b_dec")]
        assert torch.autograd.gradcheck(fn, inputs)

    def test_never_allocates_rows_by_d_sae(self):
        shape = (4096, 64, 16, 512, 8, 1, 256)  # rows x d_sae fp32 = 128 MiB
        p = to_cuda(make_problem(shape))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        encode(p)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        assert extra <= 4096 * 16 * 512 * 4 / 16, f"encode_topk allocated {extra} bytes"


# ---------------------------------------------------------------- backward ops and decode


class TestBackwardAndDecodeCuda:
    @pytest.mark.parametrize("name", list(SHAPES))
    def test_encode_backward_matches_cpu_kernel_fp32(self, name):
        p = make_problem(SHAPES[name], idle_expert=1)
        values, indices = encode(p)
        grad_values = torch.randn_like(values)
        args = (grad_values, values, indices, p["x"], p["W_enc"], p["b_dec"], p["n_active"])
        for got, want in zip(OPS.encode_backward(*to_cuda(args)), OPS.encode_backward(*args)):
            torch.testing.assert_close(got.cpu(), want, **FP32_TOL)

    def test_encode_backward_wide_rows_match_cpu_kernel_fp32(self):
        # d_in = 2100: feature_sum_kernel's second column pass, with the centring.
        p = make_problem((16, 2100, 3, 6, 2, 1, 8))
        values, indices = encode(p)
        args = (torch.randn_like(values), values, indices, p["x"], p["W_enc"], p["b_dec"], p["n_active"])
        for got, want in zip(OPS.encode_backward(*to_cuda(args)), OPS.encode_backward(*args)):
            torch.testing.assert_close(got.cpu(), want, **FP32_TOL)

    @pytest.mark.parametrize("dtype", REDUCED)
    @pytest.mark.parametrize("name", ["basic", "n_active=2", "d_expert=13,tiles"])
    def test_encode_backward_reduced_precision(self, name, dtype):
        p = to_cuda(make_problem(SHAPES[name], dtype=dtype))
        values, indices = encode(p)
        grad_values = torch.randn_like(values)
        got = OPS.encode_backward(grad_values, values, indices, p["x"], p["W_enc"], p["b_dec"], p["n_active"])
        want = reference.encode_backward(
            *in_float64(grad_values, values), indices, *in_float64(p["x"], p["W_enc"], p["b_dec"]), p["n_active"]
        )
        for g, w in zip(got, want):
            assert g.dtype == dtype
            torch.testing.assert_close(g.double(), w, **BF16_TOL)

    # Includes d_sae > 8192 (the histogram's global-atomics path), d_in not a multiple of
    # the vector width, and no rows.
    # Also: rows of several blocks' worth of columns (768: one pass; 3000: tails and, in
    # the backward, two staging passes), and features with more slots than one staging.
    @pytest.mark.parametrize("rows,k,d_sae,d_in", [
        (31, 4, 50, 12), (9, 1, 7, 5), (0, 3, 10, 4), (300, 16, 10_000, 64), (64, 8, 500, 768),
        (33, 5, 40, 3000), (600, 8, 7, 40),
    ])
    def test_decode_ops_match_cpu_kernels_fp32(self, rows, k, d_sae, d_in):
        values, indices = random_code(rows, k, d_sae)
        W_dec = torch.randn(d_sae, d_in)
        grad_out = torch.randn(rows, d_in)
        torch.testing.assert_close(OPS.decode(*to_cuda((values, indices, W_dec))).cpu(),
                                   OPS.decode(values, indices, W_dec), **FP32_TOL)
        got = OPS.decode_backward(*to_cuda((grad_out, values, indices, W_dec)))
        for g, w in zip(got, OPS.decode_backward(grad_out, values, indices, W_dec)):
            torch.testing.assert_close(g.cpu(), w, **FP32_TOL)

    @pytest.mark.parametrize("dtype", REDUCED + [torch.float64])
    @pytest.mark.parametrize("d_in", [16, 15, 768])  # vectorised, scalar, 2 rows per block
    def test_decode_ops_other_dtypes(self, dtype, d_in):
        values, indices = random_code(40, 6, 30, dtype=dtype, device="cuda")
        W_dec = torch.randn(30, d_in, dtype=torch.float64).to(dtype=dtype, device="cuda")
        grad_out = torch.randn(40, d_in, dtype=torch.float64).to(dtype=dtype, device="cuda")
        v64, W64, g64 = in_float64(values, W_dec, grad_out)
        tol = BF16_TOL if dtype in REDUCED else {}
        out = OPS.decode(values, indices, W_dec)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), reference.decode(v64, indices, W64), **tol)
        for g, w in zip(OPS.decode_backward(grad_out, values, indices, W_dec),
                        reference.decode_backward(g64, v64, indices, W64)):
            torch.testing.assert_close(g.double(), w, **tol)

    def test_decode_gradcheck_float64(self):
        values, indices = random_code(6, 3, 8, dtype=torch.float64, device="cuda")
        W_dec = torch.randn(8, 4, dtype=torch.float64, device="cuda")
        assert torch.autograd.gradcheck(ops.decode, (values.requires_grad_(True), indices, W_dec.requires_grad_(True)))

    @pytest.mark.parametrize("deterministic_mode", [False, True])
    def test_backward_ops_are_bitwise_deterministic(self, deterministic_mode):
        p = to_cuda(make_problem((512, 256, 4, 250, 8, 2, 64)))
        values, indices = encode(p)
        grad_values = torch.randn_like(values)
        grad_out = torch.randn(values.shape[0], 256, device="cuda")
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic_mode)
        try:
            runs = [
                OPS.encode_backward(grad_values, values, indices, p["x"], p["W_enc"], p["b_dec"], p["n_active"])
                + OPS.decode_backward(grad_out, values, indices, p["W_dec"])
                for _ in range(2)
            ]
        finally:
            torch.use_deterministic_algorithms(previous)
        for a, b in zip(*runs):
            assert torch.equal(a, b)


# ---------------------------------------------------------------- opcheck, compile, syncs


# Samples are built only where they will run (building them runs the CPU ops).
@pytest.mark.parametrize("op_name,args", opcheck_samples() if HAS_GPU else [], ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(op_name, args):
    torch.library.opcheck(getattr(OPS, op_name), to_cuda(args))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    p = to_cuda(make_problem(SHAPES["n_active=2"]))

    def loss_fn(x, W_enc, b_enc, b_dec, W_dec, experts):
        order, offsets = OPS.dispatch(experts, p["n_experts"])
        values, indices = OPS.encode_topk(x, W_enc, b_enc, b_dec, order, offsets, p["n_active"], p["k"], 4)
        x_hat = OPS.decode(values, indices, W_dec).view(x.shape[0], -1, x.shape[1]).sum(1) + b_dec
        return (x_hat - x).pow(2).sum()

    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        leaves = [p[n].detach().clone().requires_grad_(True) for n in ("x", "W_enc", "b_enc", "b_dec", "W_dec")]
        loss = fn(*leaves, p["experts"])
        loss.backward()
        results.append([loss.detach()] + [t.grad for t in leaves])
    torch._dynamo.reset()
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, **FP32_TOL)


def test_per_expert_path_syncs_once_per_call():
    # The one documented sync: offsets copied to the host to size the per-expert GEMMs.
    p = to_cuda(make_problem((64, 16, 4, 24, 4, 2, 16), idle_expert=1))  # float32: per expert
    order, offsets = OPS.dispatch(p["experts"], p["n_experts"])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            OPS.encode_topk(p["x"], p["W_enc"], p["b_enc"], p["b_dec"], order, offsets, p["n_active"], p["k"], 16)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in caught]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_host_synchronisation(dtype):
    # dispatch, decode and both backward ops never sync; encode_topk only on its grouped
    # path (its per-expert path copies offsets to the host once, by design).
    p = to_cuda(make_problem((64, 16, 4, 24, 4, 2, 16), dtype=dtype, idle_expert=1))
    order, offsets = OPS.dispatch(p["experts"], p["n_experts"])
    values, indices = encode(p)
    grad_values = torch.randn_like(values)
    grad_out = torch.randn(values.shape[0], 16, device="cuda", dtype=dtype)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        OPS.dispatch(p["experts"], p["n_experts"])
        if grouped_mm_runs(dtype):
            OPS.encode_topk(p["x"], p["W_enc"], p["b_enc"], p["b_dec"], order, offsets, p["n_active"], p["k"], 16)
        OPS.decode(values, indices, p["W_dec"])
        OPS.decode_backward(grad_out, values, indices, p["W_dec"])
        OPS.encode_backward(grad_values, values, indices, p["x"], p["W_enc"], p["b_dec"], p["n_active"])
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ---------------------------------------------------------------- launches per call


def kernels_launched(call) -> list[str]:
    """Names of the GPU kernels one call launches (copies and memsets left out)."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return [
        e.name for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    ]


def test_decode_is_one_launch():
    values, indices = random_code(300, 8, 500, device="cuda")
    W_dec = torch.randn(500, 768, device="cuda")
    names = kernels_launched(lambda: OPS.decode(values, indices, W_dec))
    assert len(names) == 1 and "gather_sum_kernel" in names[0], names


@pytest.mark.parametrize("k", [8, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_topk_launches_per_tile_not_per_expert_tile(dtype, k, gemm_path):
    # 32 experts over 2 tiles: a loop of ~5 launches per (expert, tile) would take ~165.
    shape = (256, 64, 32, 64, k, 1, 128)  # (batch, d_in, n_experts, d_expert, k, n_active, tile_rows)
    n_tiles, n_experts = 2, 32
    p = to_cuda(make_problem(shape, dtype=dtype))
    order, offsets = OPS.dispatch(p["experts"], n_experts)
    names = kernels_launched(
        lambda: OPS.encode_topk(p["x"], p["W_enc"], p["b_enc"], p["b_dec"], order, offsets, 1, p["k"], shape[6])
    )
    # k <= 32: one fused select kernel per tile; above, bias + at::topk + scatter.
    per_tile = (["select_topk_kernel"] if k <= 32 else ["finish_preactivations_kernel", "scatter_topk_kernel"])
    for kernel, count in [("check_routing_kernel", 1), ("gather_centered_kernel", n_tiles),
                          *[(name, n_tiles) for name in per_tile]]:
        assert sum(kernel in name for name in names) == count, (kernel, names)
    # Our 3 per tile + a radix-select TopK (1-3) + GEMMs (at most 2 kernels each, one
    # GEMM per expert-tile intersection, <= n_experts + n_tiles - 1) + 2 output fills,
    # the routing check and the grouped path's tile-ends kernel.
    bound = n_tiles * (3 + 3) + 2 * (n_experts + n_tiles - 1) + 2 + 1 + 1
    assert len(names) <= bound, names


# ---------------------------------------------------------------- autocast and ties


@pytest.mark.parametrize("op_name", OP_NAMES)
def test_op_ignores_autocast(op_name):
    assert_op_ignores_autocast("cuda", op_name)


@pytest.mark.parametrize("op_name", OP_NAMES)
def test_bf16_op_ignores_float16_autocast(op_name, gemm_path):
    # bf16 weights under an fp16 autocast: the grouped GEMM must not be cast to fp16.
    assert_op_ignores_autocast("cuda", op_name, dtype=torch.bfloat16, autocast_dtype=torch.float16)


def test_training_step_ignores_autocast():
    assert_training_step_ignores_autocast("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_b_enc", [True, False])
def test_exact_ties_match_cpu_kernel_bitwise(use_b_enc, dtype, gemm_path):
    p = tied_problem(dtype, b_enc=use_b_enc)
    for got, want in zip(encode(to_cuda(p)), encode(p)):
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("k", [64, 32])
def test_exact_ties_in_wide_experts_match_cpu_kernel_bitwise(k):
    # One expert of 32768 features and tiles of 4 rows: k = 64 takes torch's multi-block
    # radix select, k = 32 the one-pass warp selection over 1024 chunks of 32 features.
    p = tied_problem(torch.float32)
    p.update(W_enc=torch.randint(-2, 3, (1, 32768, 8)).float(), b_enc=None, n_experts=1, n_active=1,
             experts=torch.zeros(40, dtype=torch.int64), k=k, tile_rows=4)
    for got, want in zip(encode(to_cuda(p)), encode(p)):
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 5, 32, 61])
@pytest.mark.parametrize("specials", ["none", "nan_and_inf", "nan_beyond_k"])
def test_ties_nan_and_inf_match_cpu_kernel_bitwise(specials, k, dtype, gemm_path):
    p = wide_tied_problem(dtype, specials, k)
    got_values, got_indices = (t.cpu() for t in encode(to_cuda(p)))
    want_values, want_indices = encode(p)
    assert torch.equal(got_indices, want_indices)
    torch.testing.assert_close(got_values, want_values, equal_nan=True, rtol=0, atol=0)


# ---------------------------------------------------------------- bad input


def bad_calls(device):
    """Calls that the shared checks (csrc/checks.cpp) reject before any data is read."""
    p = make_problem(SHAPES["basic"], device=device)
    x, W_enc, b_enc, b_dec, W_dec = p["x"], p["W_enc"], p["b_enc"], p["b_dec"], p["W_dec"]
    order, offsets = OPS.dispatch(p["experts"], p["n_experts"])
    values, indices = encode(p)
    enc = (x, W_enc, b_enc, b_dec, order, offsets, 1, p["k"], 8)
    return {
        "dispatch experts 2-D": lambda: OPS.dispatch(p["experts"].view(1, -1), 4),
        "dispatch n_experts 0": lambda: OPS.dispatch(p["experts"], 0),
        "encode x 3-D": lambda: OPS.encode_topk(x.unsqueeze(0), *enc[1:]),
        "encode W_enc dtype": lambda: OPS.encode_topk(x, W_enc.double(), *enc[2:]),
        "encode k > d_expert": lambda: OPS.encode_topk(*enc[:7], W_enc.shape[1] + 1, 8),
        "encode tile_rows 0": lambda: OPS.encode_topk(*enc[:8], 0),
        "encode order int32": lambda: OPS.encode_topk(*enc[:4], order.int(), *enc[5:]),
        "encode offsets size": lambda: OPS.encode_topk(*enc[:5], offsets[:-1], *enc[6:]),
        "encode_backward rows": lambda: OPS.encode_backward(values, values, indices, x, W_enc, b_dec, 2),
        "decode indices int32": lambda: OPS.decode(values, indices.int(), W_dec),
        "decode W_dec dtype": lambda: OPS.decode(values, indices, W_dec.bfloat16()),
        "decode values non-contiguous": lambda: OPS.decode(values.t().contiguous().t(), indices, W_dec),
        "decode_backward grad_out shape": lambda: OPS.decode_backward(values, values, indices, W_dec),
    }


def error_message(call) -> str:
    with pytest.raises(RuntimeError) as caught:
        call()
    return str(caught.value).splitlines()[0]


@pytest.mark.parametrize("case", list(bad_calls("cpu")) if HAS_GPU else [])
def test_same_error_messages_as_cpu(case):
    assert error_message(bad_calls("cuda")[case]) == error_message(bad_calls("cpu")[case])


def test_mixed_devices_are_rejected_by_name():
    values, indices = random_code(5, 2, 6, device="cuda")
    with pytest.raises(RuntimeError, match="W_dec is on cpu but values is on cuda"):
        OPS.decode(values, indices, torch.randn(6, 4))


@pytest.mark.parametrize(
    "call,message",
    [
        ("OPS.decode(torch.ones(2, 2, device='cuda'), torch.tensor([[0, 9], [1, 2]], device='cuda'), "
         "torch.ones(4, 3, device='cuda'))", "indices out of range"),
        ("OPS.dispatch(torch.tensor([0, 5, 1], device='cuda'), 3)", "expert id or feature index is out of range"),
        ("OPS.encode_topk(torch.ones(2, 4, device='cuda'), torch.ones(2, 3, 4, device='cuda'), None, "
         "torch.zeros(4, device='cuda'), torch.tensor([0, 7], device='cuda'), torch.tensor([0, 1, 2], device='cuda'), "
         "1, 2, 8)", "order out of range"),
        ("OPS.encode_topk(torch.ones(0, 4, device='cuda'), torch.ones(2, 3, 4, device='cuda'), None, "
         "torch.zeros(4, device='cuda'), torch.zeros(0, dtype=torch.int64, device='cuda'), "
         "torch.tensor([0, 1, 0], device='cuda'), 1, 2, 8)", "offsets must be non-decreasing"),
    ],
    ids=["decode index", "dispatch expert", "encode_topk order", "encode_topk offsets, no rows"],
)
def test_out_of_range_data_is_a_device_assert(call, message):
    # A device-side assert poisons the CUDA context, so each case runs in its own process.
    script = f"import torch, switch_sae\nOPS = torch.ops.switch_sae\n{call}\ntorch.cuda.synchronize()\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "device-side assert" in output or message in output, output[-3000:]
