"""Fuzz tests of the compiled ``switch_sae`` ops: valid calls agree with ``reference.py``,
hostile calls fail with a clear error, and nothing crashes or hangs.

Valid inputs come from hypothesis (fixed seed, so CI runs the same examples each time):
random shapes including the awkward ones (batch 0 and 1, k = 1 and k = d_expert, experts
that receive no token, n_active > 1, widths that are not powers of two, d_in = 0) in
float32, float64, bfloat16 and float16, each compared with the reference evaluated in
float64 on the same inputs.

Hostile inputs (tests/op_fuzz_cases.py) run in a child process, so a segfault or a hang
fails a test instead of ending the session: every case must raise an error that starts
with ``switch_sae:`` and names the argument, or, for extreme but valid inputs (NaN, inf,
a huge ``tile_rows``), return what the reference returns. The run prints its figures
(cases per op, crashes, hangs, silent results). SWITCH_SAE_FUZZ_SEED and
SWITCH_SAE_FUZZ_CASES (per op) pick other cases for a longer exploratory run.

What it leaves out: gradients through autograd, opcheck and torch.compile (tests/test_ops.py).
"""

from __future__ import annotations

import collections
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import switch_sae  # noqa: F401  (registers torch.ops.switch_sae)
from op_fuzz_cases import OPS as OP_NAMES
from op_fuzz_cases import reproducers
from switch_sae import reference

OPS = torch.ops.switch_sae
CASES_SCRIPT = Path(__file__).with_name("op_fuzz_cases.py")

# Valid examples per op; derandomized, so every run draws the same ones.
FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Kernel (in its dtype) vs the reference in float64 on the same inputs. float32: the
# kernels' fp32 sums differ from exact by ~d_in ulps; 16-bit: one rounding of the output
# (plus one of the GEMM output in encode_topk), a few 2^-8 relative.
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def assert_close_to_float64(got, want, dtype):
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype])


def randn(g, *size, dtype):
    return torch.randn(*size, generator=g, dtype=torch.float64).to(dtype)


def post_relu_values(g, rows, k, dtype):
    """[rows, k] code values, about a third of them <= 0: the slots the encoder's ReLU
    masks (a backward must give them no gradient) and some negatives, which it never emits."""
    return (randn(g, rows, k, dtype=torch.float64) + 0.5).clamp_min(-0.2).to(dtype)


# ---------------------------------------------------------------- valid inputs


@st.composite
def routed_problems(draw):
    """Tensors of one routed encode: some experts idle, n_active distinct experts per token."""
    n_experts = draw(st.integers(1, 9))
    n_active = draw(st.integers(1, n_experts))
    n_idle = draw(st.integers(0, n_experts - n_active))
    d_expert = draw(st.integers(1, 24))
    p = {
        "batch": draw(st.sampled_from([0, 1]) | st.integers(0, 24)),
        "d_in": draw(st.integers(0, 40)),
        "n_experts": n_experts,
        "d_expert": d_expert,
        "n_active": n_active,
        "k": draw(st.integers(1, d_expert)),
        "tile_rows": draw(st.integers(1, 40)),
        "dtype": draw(st.sampled_from(DTYPES)),
        "use_b_enc": draw(st.booleans()),
    }
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    busy = torch.randperm(n_experts, generator=g)[n_idle:]  # experts that may receive tokens
    picks = torch.rand(p["batch"], len(busy), generator=g).argsort(dim=1)[:, :n_active]
    p["experts"] = busy[picks].reshape(-1)  # [rows]
    dtype, d_in = p["dtype"], p["d_in"]
    p["x"] = randn(g, p["batch"], d_in, dtype=dtype)
    p["W_enc"] = randn(g, n_experts, d_expert, d_in, dtype=dtype)
    p["b_enc"] = randn(g, n_experts, d_expert, dtype=dtype) if p["use_b_enc"] else None
    p["b_dec"] = randn(g, d_in, dtype=dtype)
    return p


@st.composite
def sparse_codes(draw):
    """values, indices [rows, k] (k may be 0), W_dec [d_sae, d_in] and grad_out [rows, d_in]."""
    rows = draw(st.sampled_from([0, 1]) | st.integers(0, 40))
    k, d_sae, d_in = draw(st.integers(0, 8)), draw(st.integers(1, 70)), draw(st.integers(0, 40))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return {
        "values": post_relu_values(g, rows, k, dtype),
        "indices": torch.randint(0, d_sae, (rows, k), generator=g),
        "W_dec": randn(g, d_sae, d_in, dtype=dtype),
        "grad_out": randn(g, rows, d_in, dtype=dtype),
        "dtype": dtype,
    }


@FUZZ
@given(n_experts=st.integers(1, 70), data=st.data())
def test_dispatch_matches_reference(n_experts, data):
    experts = torch.tensor(data.draw(st.lists(st.integers(0, n_experts - 1), max_size=300)), dtype=torch.int64)
    order, offsets = OPS.dispatch(experts, n_experts)
    ref_order, ref_offsets = reference.dispatch(experts, n_experts)
    assert torch.equal(order, ref_order)
    assert torch.equal(offsets, ref_offsets)


@FUZZ
@given(p=routed_problems())
def test_encode_topk_matches_reference(p):
    order, offsets = OPS.dispatch(p["experts"], p["n_experts"])
    dtype, k = p["dtype"], p["k"]
    values, indices = OPS.encode_topk(
        p["x"], p["W_enc"], p["b_enc"], p["b_dec"], order, offsets, p["n_active"], k, p["tile_rows"]
    )
    # The kernels round x - b_dec to the input dtype, as the reference does in that dtype.
    x_centered = (p["x"] - p["b_dec"]).double()  # [batch, d_in]
    W_enc = p["W_enc"].double()
    b_enc = None if p["b_enc"] is None else p["b_enc"].double()
    no_shift = torch.zeros(p["d_in"], dtype=torch.float64)
    want, _ = reference.encode_topk(x_centered, W_enc, b_enc, no_shift, order, offsets, p["n_active"], k, 1)
    # Sorted top-k values do not depend on how ties are broken: compare them directly.
    assert_close_to_float64(values, want, dtype)
    # The ids must be k distinct features of the pair's own expert that realise those values.
    experts = p["experts"]  # [rows]
    assert torch.equal(indices // p["d_expert"], experts.unsqueeze(1).expand_as(indices))
    assert all(len(set(row)) == k for row in indices.tolist())
    tokens = torch.arange(len(experts)) // p["n_active"]  # [rows]
    pre = torch.einsum("rd,rfd->rf", x_centered[tokens], W_enc[experts])  # [rows, d_expert]
    if b_enc is not None:
        pre = pre + b_enc[experts]
    assert_close_to_float64(values, pre.gather(1, indices % p["d_expert"]).relu(), dtype)


@FUZZ
@given(p=routed_problems(), k=st.integers(0, 8), seed=st.integers(0, 2**31 - 1))
def test_encode_backward_matches_reference(p, k, seed):
    # A code of the problem's shape: any ids in [0, d_sae) and a ReLU mask of any pattern.
    rows, d_sae = p["batch"] * p["n_active"], p["n_experts"] * p["d_expert"]
    dtype, g = p["dtype"], torch.Generator().manual_seed(seed)
    values = post_relu_values(g, rows, k, dtype)
    grad_values = randn(g, rows, k, dtype=dtype)
    indices = torch.randint(0, d_sae, (rows, k), generator=g)
    got = OPS.encode_backward(grad_values, values, indices, p["x"], p["W_enc"], p["b_dec"], p["n_active"])
    x_centered = (p["x"] - p["b_dec"]).double()  # rounded in dtype, as the kernels do
    want = reference.encode_backward(
        grad_values.double(), values.double(), indices, x_centered, p["W_enc"].double(),
        torch.zeros(p["d_in"], dtype=torch.float64), p["n_active"],
    )
    for g_, w in zip(got, want):
        assert_close_to_float64(g_, w, dtype)


@FUZZ
@given(code=sparse_codes())
def test_decode_matches_reference(code):
    values, indices, W_dec, dtype = code["values"], code["indices"], code["W_dec"], code["dtype"]
    want = reference.decode(values.double(), indices, W_dec.double())
    assert_close_to_float64(OPS.decode(values, indices, W_dec), want, dtype)


@FUZZ
@given(code=sparse_codes())
def test_decode_backward_matches_reference(code):
    values, indices, W_dec, dtype = code["values"], code["indices"], code["W_dec"], code["dtype"]
    grad_out = code["grad_out"]
    got = OPS.decode_backward(grad_out, values, indices, W_dec)
    want = reference.decode_backward(grad_out.double(), values.double(), indices, W_dec.double())
    for g_, w in zip(got, want):
        assert_close_to_float64(g_, w, dtype)


# ---------------------------------------------------------------- hostile inputs, in a child


SEED = int(os.environ.get("SWITCH_SAE_FUZZ_SEED", "0"))
PER_OP = int(os.environ.get("SWITCH_SAE_FUZZ_CASES", "200"))
STARTUP_TIMEOUT = 300  # seconds for the child to import torch on a busy machine
CASE_TIMEOUT = 60  # seconds for one tiny call: far above any real run time, so a hang
REPRODUCERS = reproducers()  # the first cases of every run


def _lines(stream, out: queue.Queue):
    for line in stream:
        out.put(line)
    out.put(None)


def _run_child(start: int, records: dict) -> tuple[int | None, int]:
    """Run cases from ``start`` in one child; returns (total, next case to run)."""
    with tempfile.TemporaryFile("w+") as err:
        cmd = [sys.executable, str(CASES_SCRIPT), "--seed", str(SEED), "--per-op", str(PER_OP), "--start", str(start)]
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_lines, args=(child.stdout, lines), daemon=True).start()
        total, current, timeout = None, None, STARTUP_TIMEOUT
        while True:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                child.kill()
                child.wait()
                if current is None:
                    raise AssertionError(f"the fuzz child printed nothing for {timeout} s")
                records[current["start"]] = {**current, "outcome": "hang", "passed": False,
                                             "detail": f"no answer within {CASE_TIMEOUT} s"}
                return total, current["start"] + 1
            if line is None:
                break
            message = json.loads(line)
            timeout = CASE_TIMEOUT
            if "total" in message:
                total = message["total"]
            elif "start" in message:
                current = message
            else:
                records[message["done"]] = {**current, **message}
                current = None
        code = child.wait()
        err.seek(0)
        tail = err.read()[-3000:]
    if current is None:
        if code != 0:
            raise AssertionError(f"the fuzz child failed outside any case (exit {code}):\n{tail}")
        return total, total
    records[current["start"]] = {**current, "outcome": "crash", "passed": False,
                                 "detail": f"exit status {code}:\n{tail}"}
    return total, current["start"] + 1


@pytest.fixture(scope="module")
def hostile_run() -> dict[int, dict]:
    """Every hostile case's record, running on in a new child after a crash or a hang."""
    records: dict[int, dict] = {}
    start, total = 0, None
    while total is None or start < total:
        total, start = _run_child(start, records)
    counts = collections.defaultdict(collections.Counter)
    for r in records.values():
        counts[r["op"]][r["outcome"]] += 1
    print(f"\nhostile calls (seed {SEED}, {PER_OP} random per op, plus the reproducers):")
    for op, c in sorted(counts.items()):
        print(f"  {op:16s} cases {sum(c.values()):4d}  " + "  ".join(f"{k} {v}" for k, v in sorted(c.items())))
    return records


def _failures(records) -> str:
    return "\n".join(f"case {r['start']} {r['note']}: {r['outcome']}: {r['detail']}" for r in records)


@pytest.mark.parametrize("case", range(len(REPRODUCERS)), ids=[c.describe() for c in REPRODUCERS])
def test_reproducer_fails_cleanly(hostile_run, case):
    record = hostile_run[case]
    assert record["kind"] == "reproducer"
    assert record["passed"], _failures([record])


@pytest.mark.parametrize("op", OP_NAMES)
def test_hostile_calls_fail_cleanly(hostile_run, op):
    mine = [r for r in hostile_run.values() if r["op"] == op and r["kind"] != "reproducer"]
    assert len(mine) == PER_OP
    failed = [r for r in mine if not r["passed"]]
    assert not failed, f"{len(failed)} of {len(mine)} cases failed:\n" + _failures(failed[:20])
