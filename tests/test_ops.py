"""Op-level tests of the compiled ``switch_sae`` custom ops against ``switch_sae.reference``.

Every op is called as ``torch.ops.switch_sae.<op>`` after ``import switch_sae``, the way
another codebase would. Checked per op: outputs and gradients against the reference
(float32 tightly; bfloat16 against a float64 evaluation of the reference on the same
inputs, with the looser tolerance below), float64 ``gradcheck``, ``opcheck``,
``torch.compile(fullgraph=True)``, bitwise determinism of the backward ops, awkward
shapes, and errors that name the offending argument.

What it leaves out: model-level behaviour (tests/test_switch.py) and timing.
"""

from __future__ import annotations

import pytest
import torch

import switch_sae
from switch_sae import ops, reference

OPS = torch.ops.switch_sae if switch_sae.ops.HAS_EXTENSION else None
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.with_cuda() else [])

# float32 vs the float32 reference: only summation order differs.
FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}
# bfloat16 (and float16) kernels vs the reference evaluated in float64 on the same
# inputs: kernels accumulate in float32 and round once, so the error is a few bfloat16
# ulps (2^-8 relative) of each output; the worst seen over 60 seeds is 1/5 of this bound.
BF16_TOL = {"rtol": 2e-2, "atol": 2e-2}

# (batch, d_in, n_experts, d_expert, k, n_active, tile_rows)
SHAPES = {
    "basic": (29, 12, 4, 10, 3, 1, 1024),
    "k=1": (17, 8, 3, 6, 1, 1, 1024),
    "k=d_expert": (17, 8, 3, 5, 5, 1, 1024),
    "one_expert": (13, 8, 1, 7, 3, 1, 1024),
    "d_expert=13,tiles": (40, 9, 3, 13, 4, 1, 3),
    "n_active=2": (21, 10, 5, 6, 3, 2, 4),
    "empty_batch": (0, 8, 3, 6, 2, 1, 1024),
}


def make_problem(shape, dtype=torch.float32, device="cpu", b_enc=True, idle_expert=None, seed=0):
    """Random tensors for one routed encode/decode; ``idle_expert`` receives no token."""
    batch, d_in, n_experts, d_expert, k, n_active, tile_rows = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)

    allowed = torch.tensor([e for e in range(n_experts) if e != idle_expert])
    # n_active distinct experts per token, drawn from the allowed ones.
    picks = torch.rand(batch, len(allowed), generator=g).argsort(dim=1)[:, :n_active]
    experts = allowed[picks].reshape(-1).to(device)  # [rows]
    return {
        "x": randn(batch, d_in),
        "W_enc": randn(n_experts, d_expert, d_in),
        "b_enc": randn(n_experts, d_expert) if b_enc else None,
        "b_dec": randn(d_in),
        "W_dec": randn(n_experts * d_expert, d_in),
        "experts": experts,
        "n_experts": n_experts,
        "n_active": n_active,
        "k": k,
        "tile_rows": tile_rows,
    }


def routed_preactivations(p):
    """``[rows, d_expert]`` float64 pre-activations of every pair under its own expert."""
    x, W_enc, b_enc, b_dec = in_float64(p["x"], p["W_enc"], p["b_enc"], p["b_dec"])
    pre = torch.einsum("bd,efd->bef", x - b_dec, W_enc)  # [batch, n_experts, d_expert]
    if b_enc is not None:
        pre = pre + b_enc
    experts = p["experts"]
    rows = torch.arange(len(experts), device=experts.device)
    return pre.repeat_interleave(p["n_active"], 0)[rows, experts]


def decided_slots(pre, k, rel_margin=1e-2):
    """``[rows, k]`` bool: TopK slots whose feature no rounding error can change.

    A slot is decided when, in ``pre`` sorted descending, its value is more than
    ``rel_margin * max|pre|`` (per row) away from the values before and after it (the
    last slot's successor is the best unchosen value). Summation order, TF32 or a
    different BLAS perturb pre-activations far less, so ids at decided slots must agree
    exactly; near-ties elsewhere are checked through the values.
    """
    top = pre.sort(dim=-1, descending=True).values  # [rows, d_expert]
    pad = torch.full_like(top[:, :1], float("-inf"))
    top = torch.cat([-pad, top[:, :k], pad if k == pre.shape[1] else top[:, k : k + 1]], dim=1)
    gaps = top[:, :-1] - top[:, 1:]  # [rows, k + 1]: gap above slot j (and below the last)
    margin = rel_margin * pre.abs().amax(dim=1, keepdim=True)
    return (gaps[:, :-1] > margin) & (gaps[:, 1:] > margin)


def assert_same_topk(values, indices, ref_values, ref_indices, pre, tol):
    """Values close, and feature ids equal wherever the selection is decided."""
    torch.testing.assert_close(values, ref_values, **tol)
    decided = decided_slots(pre, values.shape[1])
    assert decided.numel() == 0 or decided.float().mean() > 0.5, "too few decided slots to test"
    assert torch.equal(indices[decided], ref_indices[decided])


def assert_valid_topk(p, values, indices):
    """Each pair's ids are its expert's, and the chosen pre-activations (float64 of the
    same inputs) are the k largest up to reduced-precision rounding, ReLU'd."""
    pre = routed_preactivations(p)  # [rows, d_expert]
    d_expert = pre.shape[1]
    assert torch.equal(indices // d_expert, p["experts"].unsqueeze(1).expand_as(indices))
    chosen = pre.gather(1, indices % d_expert)  # [rows, k]
    torch.testing.assert_close(values.double(), chosen.relu(), **BF16_TOL)
    unchosen = pre.scatter(1, indices % d_expert, float("-inf")).amax(1)
    assert torch.all(chosen.min(1).values >= unchosen - 0.05 * pre.abs().amax(1))


def encode(p):
    """Dispatch + encode_topk with the compiled ops."""
    order, offsets = OPS.dispatch(p["experts"], p["n_experts"])
    return OPS.encode_topk(
        p["x"], p["W_enc"], p["b_enc"], p["b_dec"], order, offsets, p["n_active"], p["k"], p["tile_rows"]
    )


def in_float64(*tensors):
    return [None if t is None else t.double() for t in tensors]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # unseeded draws (randn_like, ...) are the same in every run


def test_extension_is_loaded():
    assert switch_sae.ops.HAS_EXTENSION, "switch_sae._C is not built: run pip install -e ."
    for name in ("dispatch", "encode_topk", "encode_backward", "decode", "decode_backward"):
        assert hasattr(torch.ops.switch_sae, name)


# ---------------------------------------------------------------- dispatch


class TestDispatch:
    @pytest.mark.parametrize("name", list(SHAPES))
    def test_matches_reference(self, name):
        p = make_problem(SHAPES[name], idle_expert=1 if SHAPES[name][2] > 2 else None)
        order, offsets = OPS.dispatch(p["experts"], p["n_experts"])
        ref_order, ref_offsets = reference.dispatch(p["experts"], p["n_experts"])
        assert torch.equal(order, ref_order)
        assert torch.equal(offsets, ref_offsets)

    def test_is_stable_and_skips_idle_experts(self):
        experts = torch.tensor([2, 0, 2, 2, 0, 3])
        order, offsets = OPS.dispatch(experts, 5)
        assert order.tolist() == [1, 4, 0, 2, 3, 5]
        assert offsets.tolist() == [0, 2, 2, 5, 6, 6]


# ---------------------------------------------------------------- encode_topk


class TestEncodeTopk:
    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("use_b_enc", [True, False])
    @pytest.mark.parametrize("name", list(SHAPES))
    def test_matches_reference_fp32(self, name, use_b_enc, device):
        shape = SHAPES[name]
        p = make_problem(shape, device=device, b_enc=use_b_enc, idle_expert=0 if shape[2] > 2 else None)
        order, offsets = OPS.dispatch(p["experts"], p["n_experts"])
        args = (p["x"], p["W_enc"], p["b_enc"], p["b_dec"], order, offsets, p["n_active"], p["k"], p["tile_rows"])
        values, indices = OPS.encode_topk(*args)
        ref_values, ref_indices = reference.encode_topk(*args)
        assert_same_topk(values, indices, ref_values, ref_indices, routed_preactivations(p), FP32_TOL)
        d_expert = shape[3]
        assert torch.equal(indices // d_expert, p["experts"].unsqueeze(1).expand_as(indices))
        assert torch.all(values[:, :-1] >= values[:, 1:])  # sorted descending

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("name", ["basic", "n_active=2", "d_expert=13,tiles"])
    def test_reduced_precision_selects_a_valid_topk(self, name, dtype):
        # Rounding may reorder near-ties, so check the defining property instead of ids:
        # the chosen pre-activations (float64 of the same inputs) are the k largest.
        p = make_problem(SHAPES[name], dtype=dtype)
        values, indices = encode(p)
        assert values.dtype == dtype
        assert_valid_topk(p, values, indices)

    @pytest.mark.parametrize("use_b_enc", [True, False])
    @pytest.mark.parametrize("name", ["basic", "n_active=2", "k=d_expert", "empty_batch"])
    def test_autograd_matches_reference(self, name, use_b_enc):
        p = make_problem(SHAPES[name], b_enc=use_b_enc, idle_expert=2)
        order, offsets = OPS.dispatch(p["experts"], p["n_experts"])
        leaves = ["x", "W_enc", "b_dec"] + (["b_enc"] if use_b_enc else [])
        weight = torch.randn(len(p["experts"]), p["k"], generator=torch.Generator().manual_seed(1))
        grads = []
        for fn in (ops.encode_topk, reference.encode_topk):
            q = {n: (t.detach().clone().requires_grad_(True) if n in leaves else t) for n, t in p.items()}
            values, _ = fn(
                q["x"], q["W_enc"], q["b_enc"], q["b_dec"], order, offsets, q["n_active"], q["k"], q["tile_rows"]
            )
            (values * weight).sum().backward()
            grads.append([q[n].grad for n in leaves])
        for name_, got, want in zip(leaves, *grads):
            torch.testing.assert_close(got, want, **FP32_TOL, msg=lambda m: f"{name_}: {m}")

    @pytest.mark.parametrize("use_b_enc", [True, False])
    def test_gemm_tails_match_float64(self, use_b_enc):
        # d_in 37 = two full 16-lane chunks and a 5-lane tail, d_expert 70 not a multiple
        # of the kernel's 4- and 8-feature blocks, tiles of 7 rows not a multiple of its 4.
        p = make_problem((45, 37, 3, 70, 70, 2, 7), b_enc=use_b_enc)
        values, indices = encode(p)
        pre = routed_preactivations(p)  # float64 [rows, d_expert]: with k = d_expert every value is kept
        want = pre.gather(1, indices % 70).relu()
        torch.testing.assert_close(values.double(), want, **FP32_TOL)

    def test_one_big_tile_equals_many_small_ones_bitwise(self):
        # Tiles of 1024 rows x 2050 features x 513 inputs run one after another with the
        # GEMM split over threads by features; tiles of 64 rows run one per thread. With
        # the extension's own GEMM every pre-activation is computed the same way on both
        # paths, so the codes are the same bits; with torch's BLAS, close.
        p = make_problem((1024, 513, 1, 2050, 8, 1, 1024))
        one_tile = encode(p)
        many_tiles = encode({**p, "tile_rows": 64})
        if switch_sae.ops.cpu_encoder_gemm() == "avx512":
            assert all(torch.equal(a, b) for a, b in zip(one_tile, many_tiles))
        else:
            torch.testing.assert_close(one_tile[0], many_tiles[0], **FP32_TOL)

    def test_gradcheck_float64(self):
        p = separated_problem()
        order, offsets = OPS.dispatch(p["experts"], p["n_experts"])

        def fn(x, W_enc, b_enc, b_dec):
            return ops.encode_topk(x, W_enc, b_enc, b_dec, order, offsets, p["n_active"], p["k"], 2)[0]

        inputs = [p[n].detach().requires_grad_(True) for n in ("x", "W_enc", "b_enc", "b_dec")]
        assert torch.autograd.gradcheck(fn, inputs)


class TestTopkTies:
    """The TopK rule of every kernel and of ``reference.topk``: larger values first, NaN
    above every number, equal values (-0.0 == +0.0) by lower feature id."""

    @pytest.mark.parametrize("device", DEVICES)
    def test_ties_go_to_the_lower_feature_id(self, device):
        pre = torch.tensor([1.0, 3.0, float("nan"), 3.0, -0.0, 3.0, float("nan"), 0.0, -1.0])
        x = torch.ones(1, 1, device=device)
        W_enc = pre.view(1, -1, 1).to(device)  # pre-activations = W_enc for x = 1
        experts = torch.zeros(1, dtype=torch.int64, device=device)
        order, offsets = OPS.dispatch(experts, 1)
        b_dec = torch.zeros(1, device=device)
        want = {4: [2, 6, 1, 3], 7: [2, 6, 1, 3, 5, 0, 4], 8: [2, 6, 1, 3, 5, 0, 4, 7]}
        for k, ids in want.items():
            values, indices = OPS.encode_topk(x, W_enc, None, b_dec, order, offsets, 1, k, 8)
            assert indices[0].tolist() == ids, k
            assert torch.equal(values[0].isnan(), pre[ids].isnan().to(device))
            ref_values, ref_indices = reference.encode_topk(x, W_enc, None, b_dec, order, offsets, 1, k, 8)
            assert ref_indices[0].tolist() == ids, k
            torch.testing.assert_close(values, ref_values, equal_nan=True, rtol=0, atol=0)

    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("use_b_enc", [True, False])
    def test_exact_ties_match_the_reference_bitwise(self, use_b_enc, dtype, device):
        p = tied_problem(dtype, device, b_enc=use_b_enc)
        values, indices = encode(p)
        order, offsets = OPS.dispatch(p["experts"], p["n_experts"])
        ref_values, ref_indices = reference.encode_topk(
            p["x"], p["W_enc"], p["b_enc"], p["b_dec"], order, offsets, p["n_active"], p["k"], p["tile_rows"]
        )
        assert torch.equal(indices, ref_indices)
        assert torch.equal(values, ref_values)


class TestTopkSelection:
    """The CPU kernel selects in one pass per row (a threshold test per block of 16
    features, a heap of the k best so far). Rows of exact integer ties, NaN and +-inf
    features wide enough for full blocks and a remainder, against the reference bitwise."""

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("k", [1, 5, 32, 61])
    @pytest.mark.parametrize("specials", ["none", "nan_and_inf", "nan_beyond_k"])
    def test_matches_the_reference_bitwise(self, specials, k, dtype):
        p = wide_tied_problem(dtype, specials, k)
        values, indices = encode(p)
        order, offsets = OPS.dispatch(p["experts"], p["n_experts"])
        ref_values, ref_indices = reference.encode_topk(
            p["x"], p["W_enc"], p["b_enc"], p["b_dec"], order, offsets, p["n_active"], p["k"], p["tile_rows"]
        )
        assert torch.equal(indices, ref_indices)
        torch.testing.assert_close(values, ref_values, equal_nan=True, rtol=0, atol=0)
        if specials == "nan_beyond_k":  # more NaN features than k: all chosen are NaN
            assert values[:, : min(k, 39)].isnan().all()

    def test_k_equal_to_a_wide_d_expert_sorts_the_whole_row(self):
        p = wide_tied_problem(torch.float32, "nan_and_inf", k=61)
        p["W_enc"], p["b_enc"] = p["W_enc"][:, :61].contiguous(), p["b_enc"][:, :61].contiguous()
        values, indices = encode(p)
        pre = routed_preactivations(p)  # [rows, 61]
        want_values, want_ids = reference.topk(pre, 61)
        assert torch.equal(indices % 61, want_ids)
        torch.testing.assert_close(values.double(), want_values.relu(), equal_nan=True, rtol=0, atol=0)


def wide_tied_problem(dtype, specials, k, seed=0):
    """A routed problem of small integers (exact in bfloat16, so most rows hold exact
    ties, also at the k-th place) whose experts are 200 features wide: 12 blocks of 16
    and a remainder. Expert 1 gets no token; tiles of 3 rows hold fewer rows than k.
    specials: "nan_and_inf" makes a few features NaN (through W_enc) and +-inf (through
    b_enc) at the start, middle and end of the row; "nan_beyond_k" makes 39 features NaN."""
    p = make_problem((24, 8, 3, 200, k, 2, 3), idle_expert=1, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for name in ("x", "W_enc", "b_enc", "b_dec"):
        p[name] = torch.randint(-2, 3, p[name].shape, generator=g).to(torch.float32)
    if specials == "nan_and_inf":
        p["W_enc"][:, [0, 17, 150, 199], 0] = float("nan")
        p["b_enc"][:, [3, 64, 191]] = float("inf")
        p["b_enc"][:, [1, 100, 198]] = float("-inf")
    elif specials == "nan_beyond_k":
        p["W_enc"][:, 5:200:5, 0] = float("nan")
    for name in ("x", "W_enc", "b_enc", "b_dec"):
        p[name] = p[name].to(dtype)
    return p


def tied_problem(dtype, device="cpu", b_enc=True, seed=0):
    """A routed problem of small integers: every pre-activation is an exact integer in
    [-66, 66] (exact in float32 and bfloat16 whatever the summation order), and with 12
    features per expert most rows hold exact ties, also at the k-th place."""
    p = make_problem((40, 8, 3, 12, 4, 2, 16), b_enc=b_enc, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for name in ("x", "W_enc", "b_enc", "b_dec", "W_dec"):
        if p[name] is not None:
            p[name] = torch.randint(-2, 3, p[name].shape, generator=g).to(dtype=dtype, device=device)
    p["experts"] = p["experts"].to(device)
    return p


def separated_problem():
    """Tiny float64 problem whose pre-activations are >= 1e-2 apart and away from 0, so
    finite differences (eps 1e-6) never change the TopK selection or the ReLU mask."""
    shape = (6, 5, 3, 5, 3, 2, 2)
    for seed in range(100):
        p = make_problem(shape, dtype=torch.float64, seed=seed)
        pre = torch.einsum("bd,efd->bef", p["x"] - p["b_dec"], p["W_enc"]) + p["b_enc"]
        pre = pre.repeat_interleave(shape[5], 0)[torch.arange(len(p["experts"])), p["experts"]]
        top = pre.sort(dim=1, descending=True).values[:, : shape[4] + 1]  # [rows, k + 1]
        relu_zeros = (top[:, : shape[4]] < 0).any()
        if (top[:, :-1] - top[:, 1:]).min() > 1e-2 and top[:, : shape[4]].abs().min() > 1e-2 and relu_zeros:
            return p
    raise AssertionError("no well-separated problem found")


# ---------------------------------------------------------------- encode_backward


class TestEncodeBackward:
    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("name", list(SHAPES))
    def test_matches_reference_fp32(self, name, device):
        p = make_problem(SHAPES[name], device=device, idle_expert=1)
        values, indices = encode(p)
        grad_values = torch.randn_like(values)
        args = (grad_values, values, indices, p["x"], p["W_enc"], p["b_dec"], p["n_active"])
        for got, want in zip(OPS.encode_backward(*args), reference.encode_backward(*args)):
            torch.testing.assert_close(got, want, **FP32_TOL)

    @pytest.mark.parametrize("name", ["basic", "n_active=2", "d_expert=13,tiles"])
    def test_matches_reference_bf16(self, name):
        p = make_problem(SHAPES[name], dtype=torch.bfloat16)
        values, indices = encode(p)
        grad_values = torch.randn_like(values)
        got = OPS.encode_backward(grad_values, values, indices, p["x"], p["W_enc"], p["b_dec"], p["n_active"])
        # The kernel rounds x - b_dec to bfloat16 as the forward did; give float64 the same rows.
        x_centered = (p["x"] - p["b_dec"]).double()
        no_shift = torch.zeros_like(x_centered[0])  # [d_in]
        want = reference.encode_backward(
            *in_float64(grad_values, values), indices, x_centered, p["W_enc"].double(), no_shift, p["n_active"]
        )
        for g, w in zip(got, want):
            assert g.dtype == torch.bfloat16
            torch.testing.assert_close(g.double(), w, **BF16_TOL)

    def test_relu_zeros_get_no_gradient(self):
        p = make_problem(SHAPES["basic"])
        values, indices = encode(p)
        values = values.clone()
        values[:, 1:] = 0  # only slot 0 active
        grad_values = torch.randn_like(values)
        masked = grad_values.clone()
        masked[:, 1:] = 0
        args = (p["x"], p["W_enc"], p["b_dec"], p["n_active"])
        for a, b in zip(OPS.encode_backward(grad_values, values, indices, *args),
                        OPS.encode_backward(masked, values, indices, *args)):
            assert torch.equal(a, b)


# ---------------------------------------------------------------- decode / decode_backward


def random_code(rows, k, d_sae, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, k, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    indices = torch.randint(0, d_sae, (rows, k), generator=g).to(device)
    return values, indices


class TestDecode:
    @pytest.mark.parametrize("device", DEVICES)
    @pytest.mark.parametrize("rows,k,d_sae,d_in", [(31, 4, 50, 12), (9, 1, 7, 5), (0, 3, 10, 4), (16, 7, 7, 33)])
    def test_forward_and_backward_match_reference_fp32(self, rows, k, d_sae, d_in, device):
        values, indices = random_code(rows, k, d_sae, device=device)
        W_dec = torch.randn(d_sae, d_in, device=device)
        want = reference.decode(values, indices, W_dec)
        torch.testing.assert_close(OPS.decode(values, indices, W_dec), want, **FP32_TOL)
        grad_out = torch.randn(rows, d_in, device=device)
        got = OPS.decode_backward(grad_out, values, indices, W_dec)
        want = reference.decode_backward(grad_out, values, indices, W_dec)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **FP32_TOL)

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_reduced_precision_matches_reference(self, dtype):
        values, indices = random_code(40, 6, 30, dtype=dtype)
        W_dec = torch.randn(30, 16).to(dtype)
        grad_out = torch.randn(40, 16).to(dtype)
        v64, W64, g64 = in_float64(values, W_dec, grad_out)
        out = OPS.decode(values, indices, W_dec)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), reference.decode(v64, indices, W64), **BF16_TOL)
        for g, w in zip(OPS.decode_backward(grad_out, values, indices, W_dec),
                        reference.decode_backward(g64, v64, indices, W64)):
            torch.testing.assert_close(g.double(), w, **BF16_TOL)

    def test_autograd_matches_reference(self):
        values, indices = random_code(20, 5, 40)
        W_dec = torch.randn(40, 9)
        weight = torch.randn(20, 9)
        grads = []
        for fn in (ops.decode, reference.decode):
            v, W = values.clone().requires_grad_(True), W_dec.clone().requires_grad_(True)
            (fn(v, indices, W) * weight).sum().backward()
            grads.append((v.grad, W.grad))
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, **FP32_TOL)

    def test_gradcheck_float64(self):
        values, indices = random_code(6, 3, 8, dtype=torch.float64)
        W_dec = torch.randn(8, 4, dtype=torch.float64)
        inputs = (values.requires_grad_(True), indices, W_dec.requires_grad_(True))
        assert torch.autograd.gradcheck(ops.decode, inputs)

    def test_features_never_hit_get_zero_gradient(self):
        values = torch.randn(5, 2)
        indices = torch.tensor([[0, 3]] * 5)
        _, grad_W_dec = OPS.decode_backward(torch.randn(5, 4), values, indices, torch.randn(6, 4))
        assert torch.count_nonzero(grad_W_dec[[1, 2, 4, 5]]) == 0
        assert torch.count_nonzero(grad_W_dec[[0, 3]]) == 8


# ---------------------------------------------------------------- autocast


def op_calls(device, dtype=torch.float32):
    """One call of every op on ``dtype`` inputs on ``device``, by op name."""
    # d_in = 16: on an H100 the bfloat16 encode_topk takes its grouped GEMM path.
    p = make_problem((21, 16, 5, 6, 3, 2, 4), dtype=dtype, device=device, idle_expert=0)
    order, offsets = OPS.dispatch(p["experts"], p["n_experts"])
    enc_args = (p["x"], p["W_enc"], p["b_enc"], p["b_dec"], order, offsets, p["n_active"], p["k"], p["tile_rows"])
    values, indices = OPS.encode_topk(*enc_args)
    grad_values = torch.randn_like(values)
    grad_out = torch.randn(values.shape[0], p["W_dec"].shape[1], device=device).to(dtype)
    return {
        "dispatch": lambda: OPS.dispatch(p["experts"], p["n_experts"]),
        "encode_topk": lambda: OPS.encode_topk(*enc_args),
        "encode_backward": lambda: OPS.encode_backward(
            grad_values, values, indices, p["x"], p["W_enc"], p["b_dec"], p["n_active"]
        ),
        "decode": lambda: (OPS.decode(values, indices, p["W_dec"]),),
        "decode_backward": lambda: OPS.decode_backward(grad_out, values, indices, p["W_dec"]),
    }


OP_NAMES = ("dispatch", "encode_topk", "encode_backward", "decode", "decode_backward")


def assert_op_ignores_autocast(device, op_name, dtype=torch.float32, autocast_dtype=torch.bfloat16):
    """Under torch.autocast the op runs in its inputs' dtype, bitwise as without."""
    call = op_calls(device, dtype)[op_name]
    want = call()
    with torch.autocast(device, dtype=autocast_dtype):
        got = call()
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype, f"{op_name} returned {g.dtype} under autocast, {w.dtype} without"
        assert torch.equal(g, w)


def assert_training_step_ignores_autocast(device):
    """Forward and every gradient of encode_topk + decode: the same under autocast."""
    p = make_problem(SHAPES["n_active=2"], device=device, idle_expert=0)
    order, offsets = OPS.dispatch(p["experts"], p["n_experts"])
    runs = []
    for autocast in (False, True):
        leaves = [p[n].detach().clone().requires_grad_(True) for n in ("x", "W_enc", "b_enc", "b_dec", "W_dec")]
        x, W_enc, b_enc, b_dec, W_dec = leaves
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            values, indices = ops.encode_topk(x, W_enc, b_enc, b_dec, order, offsets, p["n_active"], p["k"], 4)
            x_hat = ops.decode(values, indices, W_dec)
            loss = x_hat.square().sum()
        loss.backward()
        assert x_hat.dtype == torch.float32
        runs.append([x_hat.detach()] + [t.grad for t in leaves])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


class TestAutocast:
    @pytest.mark.parametrize("op_name", OP_NAMES)
    def test_op_ignores_autocast(self, op_name):
        assert_op_ignores_autocast("cpu", op_name)

    def test_training_step_ignores_autocast(self):
        assert_training_step_ignores_autocast("cpu")

    @pytest.mark.parametrize("key", ["AutocastCPU", "AutocastCUDA"])
    @pytest.mark.parametrize("op_name", OP_NAMES)
    def test_autocast_kernel_is_registered(self, op_name, key):
        # Without it the Autocast key falls through and the ATen calls inside the kernels
        # (at::mm, at::topk, ...) are autocast themselves: wrong dtypes on the GPU.
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"switch_sae::{op_name}", key)


# ---------------------------------------------------------------- memory


def test_no_rows_by_d_sae_tensor_is_allocated():
    # The point of routing and tiling: a full step (dispatch, encode_topk, decode and both
    # backward ops) never allocates anything near [rows, d_sae] (here 8 MiB).
    shape = (512, 32, 16, 256, 8, 1, 64)  # (batch, d_in, n_experts, d_expert, k, n_active, tile_rows)
    p = make_problem(shape)
    leaves = [p[n].requires_grad_(True) for n in ("x", "W_enc", "b_enc", "b_dec", "W_dec")]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        values, indices = encode(p)
        ops.decode(values, indices, p["W_dec"]).sum().backward()
    assert all(t.grad is not None for t in leaves)
    largest = max(e.cpu_memory_usage for e in prof.events())  # bytes of one op's own allocations
    rows_by_d_sae = 512 * 16 * 256 * 4
    assert largest <= rows_by_d_sae / 8, f"an op allocated {largest} bytes"


# ---------------------------------------------------------------- determinism


def test_ops_are_bitwise_deterministic_across_thread_counts():
    # Big enough for several parallel chunks over rows, tokens, features and expert tiles.
    p = make_problem((256, 256, 4, 250, 8, 2, 64))
    values, indices = encode(p)
    grad_values = torch.randn_like(values)
    grad_out = torch.randn(values.shape[0], 256)
    enc_args = (grad_values, values, indices, p["x"], p["W_enc"], p["b_dec"], p["n_active"])
    dec_args = (grad_out, values, indices, p["W_dec"])
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (threads, threads, 1):
            torch.set_num_threads(n)
            forward = encode(p) + (OPS.decode(values, indices, p["W_dec"]),)
            runs.append(forward + OPS.encode_backward(*enc_args) + OPS.decode_backward(*dec_args))
    finally:
        torch.set_num_threads(threads)
    for again in runs[1:]:
        for a, b in zip(runs[0], again):
            assert torch.equal(a, b)


# ---------------------------------------------------------------- opcheck and compile


def opcheck_samples():
    samples = []
    for name, grad in (("basic", False), ("n_active=2", True), ("empty_batch", False)):
        for use_b_enc in (True, False):
            p = make_problem(SHAPES[name], b_enc=use_b_enc, idle_expert=0)
            order, offsets = OPS.dispatch(p["experts"], p["n_experts"])
            samples.append(("dispatch", (p["experts"], p["n_experts"])))
            floats = [None if t is None else t.requires_grad_(grad) for t in (p["x"], p["W_enc"], p["b_enc"], p["b_dec"])]
            samples.append(("encode_topk", (*floats, order, offsets, p["n_active"], p["k"], p["tile_rows"])))
            values, indices = (t.detach() for t in encode(p))
            x, W_enc, b_dec = (p[n].detach() for n in ("x", "W_enc", "b_dec"))
            enc_back = (torch.randn_like(values), values, indices, x, W_enc, b_dec, p["n_active"])
            samples.append(("encode_backward", enc_back))
            W_dec = p["W_dec"].requires_grad_(grad)
            samples.append(("decode", (values.clone().requires_grad_(grad), indices, W_dec)))
            grad_out = torch.randn(values.shape[0], W_dec.shape[1])
            samples.append(("decode_backward", (grad_out, values, indices, W_dec.detach())))
    return samples


@pytest.mark.parametrize("op_name,args", opcheck_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(op_name, args):
    torch.library.opcheck(getattr(torch.ops.switch_sae, op_name), args)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    p = make_problem(SHAPES["n_active=2"])

    def loss_fn(x, W_enc, b_enc, b_dec, W_dec, experts):
        order, offsets = torch.ops.switch_sae.dispatch(experts, p["n_experts"])
        values, indices = torch.ops.switch_sae.encode_topk(
            x, W_enc, b_enc, b_dec, order, offsets, p["n_active"], p["k"], 4
        )
        x_hat = torch.ops.switch_sae.decode(values, indices, W_dec).view(x.shape[0], -1, x.shape[1]).sum(1) + b_dec
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


# ---------------------------------------------------------------- bad input


def bad_inputs():
    p = make_problem(SHAPES["basic"])
    x, W_enc, b_enc, b_dec, W_dec = p["x"], p["W_enc"], p["b_enc"], p["b_dec"], p["W_dec"]
    order, offsets = OPS.dispatch(p["experts"], p["n_experts"])
    values, indices = encode(p)
    rows, k = values.shape
    d_sae = W_dec.shape[0]

    def enc(**kw):
        a = dict(x=x, W_enc=W_enc, b_enc=b_enc, b_dec=b_dec, order=order, offsets=offsets, n_active=1, k=k, tile_rows=8)
        a.update(kw)
        return lambda: OPS.encode_topk(*a.values())

    def enc_back(**kw):
        a = dict(grad_values=torch.ones_like(values), values=values, indices=indices, x=x, W_enc=W_enc, b_dec=b_dec,
                 n_active=1)
        a.update(kw)
        return lambda: OPS.encode_backward(*a.values())

    def dec_back(**kw):
        a = dict(grad_out=torch.ones(rows, W_dec.shape[1]), values=values, indices=indices, W_dec=W_dec)
        a.update(kw)
        return lambda: OPS.decode_backward(*a.values())

    out_of_range = indices.clone()
    out_of_range[3, 1] = d_sae
    negative = indices.clone()
    negative[0, 0] = -1
    bad_order = order.clone()
    bad_order[0] = rows
    return {
        "dispatch experts 2-D": (lambda: OPS.dispatch(p["experts"].view(1, -1), 4), "experts must have 1 dimensions"),
        "dispatch experts int32": (lambda: OPS.dispatch(p["experts"].int(), 4), "experts must be int64"),
        "dispatch expert out of range": (lambda: OPS.dispatch(torch.tensor([0, 4, 1]), 4), r"experts\[1\] = 4 is out"),
        "dispatch negative expert": (lambda: OPS.dispatch(torch.tensor([0, -1]), 4), r"experts\[1\] = -1"),
        "dispatch n_experts 0": (lambda: OPS.dispatch(p["experts"], 0), "n_experts must be >= 1"),
        "encode x 3-D": (enc(x=x.unsqueeze(0)), "x must have 2 dimensions"),
        "encode x non-contiguous": (enc(x=torch.randn(x.shape[1], x.shape[0]).t()), "x must be contiguous"),
        "encode x integer": (enc(x=x.long()), "x must be a floating-point tensor"),
        "encode W_enc dtype": (enc(W_enc=W_enc.double()), "W_enc has dtype"),
        "encode W_enc d_in": (enc(W_enc=W_enc[..., :-1].contiguous()), r"W_enc.size\(2\) must equal"),
        "encode b_enc shape": (enc(b_enc=b_enc[:, :-1].contiguous()), r"b_enc.size\(1\) must equal"),
        "encode b_dec shape": (enc(b_dec=b_dec[:-1]), r"b_dec.size\(0\) must equal"),
        "encode k > d_expert": (enc(k=W_enc.shape[1] + 1), "must be <= d_expert"),
        "encode k 0": (enc(k=0), "k must be >= 1"),
        "encode tile_rows 0": (enc(tile_rows=0), "tile_rows must be >= 1"),
        "encode n_active 0": (enc(n_active=0), "n_active must be >= 1"),
        "encode order length": (enc(n_active=2), r"order.size\(0\) must equal rows"),
        "encode order int32": (enc(order=order.int()), "order must be int64"),
        "encode order out of range": (enc(order=bad_order), r"order\[0\] = 29 is out of range"),
        "encode offsets size": (enc(offsets=offsets[:-1]), r"offsets.size\(0\) must equal n_experts \+ 1"),
        "encode offsets values": (enc(offsets=offsets.flip(0).contiguous()), "offsets"),
        "encode offsets values, no rows": (
            enc(x=x[:0], order=order[:0], offsets=torch.tensor([0, 1, 0, 0, 0])), "offsets must be non-decreasing"
        ),
        "encode_backward grad_values shape": (enc_back(grad_values=torch.ones(rows, k + 1)), "grad_values has shape"),
        "encode_backward rows": (enc_back(n_active=2), r"values.size\(0\) must equal rows"),
        "encode_backward index out of range": (enc_back(indices=out_of_range), r"indices\[3, 1\] = 40 is out of range"),
        "encode_backward W_enc d_in": (enc_back(W_enc=W_enc[..., :-1].contiguous()), r"W_enc.size\(2\)"),
        "encode_backward x dtype": (enc_back(x=x.double()), "x has dtype"),
        "decode indices int32": (lambda: OPS.decode(values, indices.int(), W_dec), "indices must be int64"),
        "decode W_dec dtype": (lambda: OPS.decode(values, indices, W_dec.bfloat16()), "W_dec has dtype"),
        "decode shape mismatch": (lambda: OPS.decode(values, indices[:, :-1].contiguous(), W_dec), "indices has shape"),
        "decode index out of range": (lambda: OPS.decode(values, out_of_range, W_dec), r"indices\[3, 1\] = 40 is out"),
        "decode negative index": (lambda: OPS.decode(values, negative, W_dec), r"indices\[0, 0\] = -1"),
        "decode values non-contiguous": (
            lambda: OPS.decode(values.t().contiguous().t(), indices, W_dec), "values must be contiguous"
        ),
        "decode_backward grad_out shape": (dec_back(grad_out=torch.ones(rows, 3)), r"grad_out.size\(1\)"),
        "decode_backward index out of range": (dec_back(indices=out_of_range), r"indices\[3, 1\] = 40"),
    }


@pytest.mark.parametrize("case", list(bad_inputs()))
def test_bad_input_names_the_argument(case):
    call, match = bad_inputs()[case]
    with pytest.raises(RuntimeError, match=match):
        call()
