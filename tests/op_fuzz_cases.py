"""Hostile calls of the ``switch_sae`` ops, and a runner that survives them.

Each case is one op call built from a valid random problem and then broken in one way
(a wrong dtype, shape, device or contiguity, an integer argument that is out of range or
makes a size product overflow, an ``order`` that is not a permutation, an index or
offset out of range) or pushed to an extreme that is still valid (NaN and inf values, a
``tile_rows`` near 2^63). A broken call must raise an error that starts with
``switch_sae:`` and names an argument it is about; an extreme call must return what
``reference.py`` returns. Case ``i`` depends only on ``(seed, i)``, so a failing case
can be replayed alone.

Run as a script, it executes cases in a child process and prints one JSON line before
(``start``) and after (``outcome``) each, so that the parent (tests/test_fuzz_ops.py)
can attribute a crash or a hang to the case that caused it and carry on after it.

What it leaves out: agreement on valid inputs of ordinary size, which
tests/test_fuzz_ops.py checks in-process with hypothesis.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass
from typing import Callable

import torch

import switch_sae  # noqa: F401  (registers torch.ops.switch_sae)
from switch_sae import reference

OPS = ("dispatch", "encode_topk", "encode_backward", "decode", "decode_backward")

# Argument names and kinds of each op, in schema order (csrc/registration.cpp).
SCHEMAS = {
    "dispatch": {"experts": "index", "n_experts": "int"},
    "encode_topk": {
        "x": "float", "W_enc": "float", "b_enc": "float", "b_dec": "float", "order": "index",
        "offsets": "index", "n_active": "int", "k": "int", "tile_rows": "int",
    },
    "encode_backward": {
        "grad_values": "float", "values": "float", "indices": "index", "x": "float",
        "W_enc": "float", "b_dec": "float", "n_active": "int",
    },
    "decode": {"values": "float", "indices": "index", "W_dec": "float"},
    "decode_backward": {"grad_out": "float", "values": "float", "indices": "index", "W_dec": "float"},
}

# (argument, dim) whose size is tied to another argument's: changing it must be an error.
# (W_dec.size(0) and the encoder's W_enc.size(1) without b_enc are free: a larger
# dictionary is still a valid call.)
TIED_DIMS = {
    "encode_topk": [("x", 0), ("x", 1), ("W_enc", 0), ("W_enc", 2), ("b_enc", 0), ("b_enc", 1),
                    ("b_dec", 0), ("order", 0), ("offsets", 0)],
    "encode_backward": [("grad_values", 0), ("grad_values", 1), ("values", 0), ("values", 1),
                        ("indices", 0), ("indices", 1), ("x", 0), ("x", 1), ("W_enc", 2), ("b_dec", 0)],
    "decode": [("values", 0), ("values", 1), ("indices", 0), ("indices", 1)],
    "decode_backward": [("grad_out", 0), ("grad_out", 1), ("values", 0), ("values", 1),
                        ("indices", 0), ("indices", 1), ("W_dec", 1)],
}

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Products with any small size that wrap around int64 (2**62 + 1 times 4 is 4 again).
OVERFLOWING = [2**62 + 1, 2**61 + 1, 2**63 - 1, 2**32 + 1]
FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}

KINDS = ("dtype", "ndim", "size", "noncontiguous", "device", "int", "data", "nonfinite", "huge_tile")


@dataclass
class Case:
    op: str
    kind: str  # one of KINDS, or "reproducer"
    blame: tuple[str, ...]  # the error must name one of these arguments
    args: dict  # argument name -> value, in schema order
    expect: str = "error"  # "error", or "reference": must return what reference.py returns
    note: str = ""

    def describe(self) -> str:
        return f"{self.op}/{self.kind}: {self.note}"


# ---------------------------------------------------------------- valid problems


def _randn(rng: random.Random, *size, dtype=torch.float32):
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    return torch.randn(*size, generator=g, dtype=dtype)


def _randint(rng: random.Random, high: int, *size):
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    return torch.randint(0, high, size, generator=g)


def _routing(rng, batch, n_experts, n_active):
    """experts [batch * n_active] (distinct per token), and reference order, offsets."""
    experts = torch.tensor([e for _ in range(batch) for e in rng.sample(range(n_experts), n_active)],
                           dtype=torch.int64)
    order, offsets = reference.dispatch(experts, n_experts)
    return experts, order, offsets


def valid_args(op: str, rng: random.Random) -> dict:
    """A small valid call of ``op``, as {argument: value} in schema order."""
    batch, d_in = rng.randint(1, 9), rng.randint(1, 11)
    n_experts, d_expert = rng.randint(1, 5), rng.randint(1, 9)
    n_active = rng.randint(1, n_experts)
    k = rng.randint(1, d_expert)
    rows, d_sae = batch * n_active, n_experts * d_expert
    if op == "dispatch":
        experts, _, _ = _routing(rng, batch, n_experts, n_active)
        return {"experts": experts, "n_experts": n_experts}
    if op == "encode_topk":
        _, order, offsets = _routing(rng, batch, n_experts, n_active)
        return {
            "x": _randn(rng, batch, d_in), "W_enc": _randn(rng, n_experts, d_expert, d_in),
            "b_enc": _randn(rng, n_experts, d_expert) if rng.random() < 0.7 else None,
            "b_dec": _randn(rng, d_in), "order": order, "offsets": offsets,
            "n_active": n_active, "k": k, "tile_rows": rng.randint(1, rows + 2),
        }
    if op == "encode_backward":
        return {
            "grad_values": _randn(rng, rows, k), "values": _randn(rng, rows, k).relu(),
            "indices": _randint(rng, d_sae, rows, k), "x": _randn(rng, batch, d_in),
            "W_enc": _randn(rng, n_experts, d_expert, d_in), "b_dec": _randn(rng, d_in),
            "n_active": n_active,
        }
    code = {"values": _randn(rng, rows, k), "indices": _randint(rng, d_sae, rows, k),
            "W_dec": _randn(rng, d_sae, d_in)}
    if op == "decode":
        return code
    return {"grad_out": _randn(rng, rows, d_in), **code}


def tensors_of(args: dict) -> list[str]:
    return [n for n, v in args.items() if isinstance(v, torch.Tensor)]


# ---------------------------------------------------------------- breaking one thing


def _other_dtype(rng, t: torch.Tensor) -> torch.dtype:
    pool = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32,
            torch.uint8, torch.bool]
    return rng.choice([d for d in pool if d != t.dtype])


def _noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values with the same shape, laid out with a stride that is not contiguous."""
    if t.dim() >= 2 and t.shape[-1] > 1 and t.shape[-2] > 1:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    return torch.stack([t, t], dim=-1)[..., 0]  # every element two apart


def _resize(rng, t: torch.Tensor, dim: int) -> torch.Tensor:
    size = list(t.shape)
    size[dim] = size[dim] + 1 if size[dim] == 0 or rng.random() < 0.5 else size[dim] - 1
    if t.dtype == torch.int64:
        return torch.zeros(size, dtype=torch.int64)
    return _randn(rng, *size, dtype=t.dtype)


def _bad_int(rng, op: str, name: str, args: dict) -> int:
    """A value of integer argument ``name`` that must be refused."""
    always = [0, -1, INT64_MIN, *OVERFLOWING]
    if name == "n_experts":
        return rng.choice(always + [2**31, int(args["experts"].max()) if len(args["experts"]) and
                                    int(args["experts"].max()) > 0 else 0])
    if name == "n_active":
        n_experts = args["W_enc"].shape[0]
        choices = always + [n_experts + 1, n_experts + rng.randint(2, 100)]
        batch = args["x"].shape[0]
        if batch > 0 and n_experts > 1:  # in range, but not the n_active the rows were built for
            choices += [n for n in range(1, n_experts + 1) if n != args["n_active"]]
        return rng.choice(choices)
    if name == "k":
        return rng.choice(always + [args["W_enc"].shape[1] + 1])
    assert name == "tile_rows"
    return rng.choice([0, -1, INT64_MIN])


def _break_data(rng, op: str, args: dict) -> tuple[str, str]:
    """Corrupt the values of an id tensor in place; returns (argument, what was done)."""
    if op == "dispatch":
        experts, n_experts = args["experts"], args["n_experts"]
        p = rng.randrange(len(experts))
        experts[p] = rng.choice([n_experts, n_experts + 7, -1, INT64_MIN, INT64_MAX, 2**62])
        return "experts", f"experts[{p}] = {int(experts[p])}"
    if op == "encode_topk":
        order, offsets = args["order"], args["offsets"]
        rows, n_experts = len(order), len(offsets) - 1
        choice = rng.randrange(3)
        if choice == 0 and rows >= 2:
            i, j = rng.sample(range(rows), 2)
            order[i] = order[j]
            return "order", f"order[{i}] = order[{j}] (not a permutation)"
        if choice <= 1:
            p = rng.randrange(rows)
            order[p] = rng.choice([rows, rows + 3, -1, INT64_MIN, INT64_MAX])
            return "order", f"order[{p}] = {int(order[p])}"
        p = rng.randrange(n_experts + 1)
        if p == 0:
            offsets[0] = rng.choice([1, -1, INT64_MAX, INT64_MIN, rows + 1])
        elif p == n_experts:
            offsets[p] = rng.choice([rows + 1, rows - 1 if rows > 0 else -1, INT64_MAX, INT64_MIN])
        else:  # out of order with a neighbour
            offsets[p] = rng.choice([int(offsets[p - 1]) - 1, int(offsets[p + 1]) + 1, INT64_MAX, INT64_MIN])
        return "offsets", f"offsets[{p}] = {int(offsets[p])}"
    indices = args["indices"]
    d_sae = args["W_dec"].shape[0] if "W_dec" in args else args["W_enc"].shape[0] * args["W_enc"].shape[1]
    r, j = rng.randrange(indices.shape[0]), rng.randrange(indices.shape[1])
    indices[r, j] = rng.choice([d_sae, d_sae + rng.randint(1, 1000), -1, INT64_MIN, INT64_MAX, 2**62])
    return "indices", f"indices[{r}, {j}] = {int(indices[r, j])}"


def make_case(seed: int, i: int, per_op: int) -> Case:
    """Case ``i`` of a run with ``per_op`` cases for each op (ops in turn)."""
    rng = random.Random(seed * 1_000_003 + i)
    op = OPS[(i // per_op) % len(OPS)]
    args = valid_args(op, rng)
    kinds = [k for k in KINDS if not (op == "dispatch" and k in ("size", "device", "nonfinite"))]
    kinds = [k for k in kinds if not (k == "huge_tile" and op != "encode_topk")]
    kinds = [k for k in kinds if not (k == "int" and "int" not in SCHEMAS[op].values())]
    kind = rng.choice(kinds)
    tensors = tensors_of(args)
    if kind == "dtype":
        name = rng.choice(tensors)
        dtype = _other_dtype(rng, args[name])
        args[name] = args[name].to(dtype)
        return Case(op, kind, (name,), args, note=f"{name} as {dtype}")
    if kind == "ndim":
        name = rng.choice(tensors)
        args[name] = args[name].unsqueeze(rng.randint(0, args[name].dim()))
        return Case(op, kind, (name,), args, note=f"{name} with shape {tuple(args[name].shape)}")
    if kind == "size":
        name, dim = rng.choice([(n, d) for n, d in TIED_DIMS[op] if args[n] is not None])
        args[name] = _resize(rng, args[name], dim)
        # A tied size may be reported from either side of the relation.
        return Case(op, kind, tuple(tensors) + ("n_active", "n_experts", "rows", "d_in"), args,
                    note=f"{name} with shape {tuple(args[name].shape)}")
    if kind == "noncontiguous":
        name = rng.choice([n for n in tensors if args[n].numel() >= 2] or tensors)
        args[name] = _noncontiguous(args[name])
        if args[name].is_contiguous():  # one element: nothing to lay out otherwise
            args[name] = args[name].unsqueeze(0)
        return Case(op, kind, (name,), args, note=f"{name} with strides {args[name].stride()}")
    if kind == "device":
        name = rng.choice(tensors)
        args[name] = args[name].to("meta")
        return Case(op, kind, (name,), args, note=f"only {name} on meta")
    if kind == "int":
        name = rng.choice([n for n, t in SCHEMAS[op].items() if t == "int"])
        args[name] = _bad_int(rng, op, name, args)
        return Case(op, kind, (name,), args, note=f"{name} = {args[name]}")
    if kind == "data":
        name, note = _break_data(rng, op, args)
        return Case(op, kind, (name,), args, note=note)
    if kind == "nonfinite":
        name = rng.choice([n for n in tensors if args[n].is_floating_point() and args[n].numel() > 0])
        flat = args[name].view(-1)
        p = rng.randrange(flat.numel())
        flat[p] = rng.choice([float("nan"), float("inf"), float("-inf")])
        return Case(op, kind, (), args, expect="reference", note=f"{name}.view(-1)[{p}] = {float(flat[p])}")
    assert kind == "huge_tile"
    args["tile_rows"] = rng.choice([INT64_MAX, INT64_MAX - 1, 2**62 + 1, 2**31])
    return Case(op, kind, (), args, expect="reference", note=f"tile_rows = {args['tile_rows']}")


def reproducers() -> list[Case]:
    """The calls that once crashed or returned garbage, exactly as they were found."""
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(4, 5, generator=g), torch.randn(3, 8, 5, generator=g)
    b_dec = torch.zeros(5)
    cases = []
    for k in (1, 2, 4):  # k = 1 and 2 segfaulted, k = 4 returned a result
        v, i = torch.ones(4, k), torch.zeros(4, k, dtype=torch.int64)
        args = {"grad_values": v, "values": v, "indices": i, "x": x, "W_enc": W, "b_dec": b_dec,
                "n_active": 2**62 + 1}
        cases.append(Case("encode_backward", "reproducer", ("n_active",), args, note=f"n_active = 2**62 + 1, k = {k}"))
    order, offsets = reference.dispatch(torch.zeros(4, dtype=torch.int64), 3)
    topk = {"x": x, "W_enc": W, "b_enc": None, "b_dec": b_dec, "order": order, "offsets": offsets,
            "n_active": 2**62 + 1, "k": 2, "tile_rows": 8}
    cases.append(Case("encode_topk", "reproducer", ("n_active",), topk, note="n_active = 2**62 + 1"))
    six = torch.randn(6, 5, generator=g)
    order6, offsets6 = reference.dispatch(torch.zeros(6, dtype=torch.int64), 3)
    zeros_order = dict(topk, x=six, order=torch.zeros(6, dtype=torch.int64), offsets=offsets6, n_active=1)
    cases.append(Case("encode_topk", "reproducer", ("order",), zeros_order, note="order all zeros"))
    values, indices = torch.rand(4, 2, generator=g), torch.randint(0, 24, (4, 2), generator=g)
    cases.append(Case("decode", "reproducer", ("W_dec",),
                      {"values": values, "indices": indices, "W_dec": torch.randn(24, 5).to("meta")},
                      note="W_dec on meta"))
    cases.append(Case("encode_topk", "reproducer", ("offsets",), dict(topk, n_active=1, offsets=offsets.to("meta")),
                      note="only offsets on meta"))
    back = {"grad_values": values, "values": values, "indices": indices, "x": x, "W_enc": W.to("meta"),
            "b_dec": b_dec, "n_active": 1}
    cases.append(Case("encode_backward", "reproducer", ("W_enc",), back, note="only W_enc on meta"))
    return cases


def case_list(seed: int, per_op: int) -> Callable[[int], Case]:
    """Case i of the run: the reproducers first, then per_op random cases for each op."""
    fixed = reproducers()

    def case(i: int) -> Case:
        return fixed[i] if i < len(fixed) else make_case(seed, i - len(fixed), per_op)

    case.total = len(fixed) + per_op * len(OPS)
    return case


# ---------------------------------------------------------------- judging one call


def names_argument(message: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(n)}\b", message) for n in names)


def _differs_from_reference(op: str, args: dict, got) -> str | None:
    """None if ``got`` equals what reference.py returns (NaN where it has NaN), else why not."""
    try:
        want = getattr(reference, op)(*args.values())
    except Exception as e:  # noqa: BLE001
        return f"the reference raised {type(e).__name__}: {e}"
    got = (got,) if isinstance(got, torch.Tensor) else tuple(got)
    want = (want,) if isinstance(want, torch.Tensor) else tuple(want)
    if op == "encode_topk":  # ids of tied or NaN pre-activations may differ: compare values
        got, want = got[:1], want[:1]
    for g, w in zip(got, want):
        try:
            torch.testing.assert_close(g, w, equal_nan=True, **FP32_TOL)
        except AssertionError as e:
            return str(e).strip().splitlines()[0]
    return None


# Outcomes of one call. Only the first is a pass for a broken call, only the last for an
# extreme one.
PASS = {"error": "error", "reference": "agrees"}


def judge(case: Case) -> tuple[str, str]:
    """(outcome, detail) of one call. Outcomes: 'error' (a clear error), 'unclear_error'
    (an error that does not say switch_sae or name the argument), 'silent' (returned where
    an error was due), 'refused' (an error where the reference returns), 'agrees' or
    'differs' (with the reference)."""
    op = getattr(torch.ops.switch_sae, case.op)
    try:
        result = op(*case.args.values())
    except Exception as e:  # noqa: BLE001 (any exception is an answer; judged below)
        message = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
        if case.expect == "reference":
            return "refused", message
        clear = "switch_sae:" in message and names_argument(message, case.blame)
        return ("error" if clear else "unclear_error"), message
    if case.expect == "error":
        return "silent", "returned a result"
    why = _differs_from_reference(case.op, case.args, result)
    return ("agrees", "") if why is None else ("differs", why)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-op", type=int, default=200)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--stop", type=int, default=None)
    a = parser.parse_args()
    torch.set_num_threads(1)  # the cases are tiny; one thread keeps the child cheap
    case = case_list(a.seed, a.per_op)
    stop = case.total if a.stop is None else min(a.stop, case.total)
    print(json.dumps({"total": case.total}), flush=True)
    for i in range(a.start, stop):
        c = case(i)
        print(json.dumps({"start": i, "op": c.op, "kind": c.kind, "note": c.describe()}), flush=True)
        outcome, detail = judge(c)
        passed = outcome == PASS[c.expect]
        print(json.dumps({"done": i, "outcome": outcome, "passed": passed, "detail": detail}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
