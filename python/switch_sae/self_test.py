"""Self-test of the compiled ops on this machine: run it first on a new GPU.

``switch_sae.selftest()`` (or ``switch-sae selftest``) runs every compiled op on the
chosen device against its plain PyTorch twin in ``reference.py`` on a few sample shapes
(one expert, k = 1, several active experts, an expert with no tokens, tiles smaller than
an expert's tokens, no encoder bias), and checks three things per op: the forward
outputs, the gradients (for the ops with autograd), and determinism (two runs give
bitwise-equal results). It prints one row per op and returns a report whose ``ok`` is
False on any mismatch; the CLI exits non-zero then. If a kernel is wrong, set
``SWITCH_SAE_BACKEND=reference`` to keep working on the PyTorch twins.

What it leaves out: timing (``switch-sae bench``), bad-input checks (the op tests), and
the extensive tolerances study of ``tests/test_ops.py``; this is a quick smoke test.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import torch
from torch import Tensor

from . import ops, reference

# float32 kernels vs the float32 reference: only summation order differs.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
# (batch, d_in, n_experts, d_expert, k, n_active, tile_rows, with b_enc, idle expert)
SAMPLE_SHAPES = (
    (33, 12, 4, 10, 3, 1, 1024, True, None),
    (17, 8, 3, 6, 1, 1, 5, False, 1),
    (13, 9, 1, 7, 7, 1, 4, True, None),
    (21, 10, 5, 6, 3, 2, 4, True, 3),
)


def compiled_ops() -> Any:
    """The kernels under test (a seam, so tests can substitute a deliberately wrong one)."""
    return torch.ops.switch_sae


@dataclass
class OpCheck:
    """One op's outcome over all sample shapes. ``None`` means the check does not apply."""

    op: str
    forward: bool = True
    gradients: bool | None = None
    deterministic: bool = True
    max_error: float = 0.0
    """Largest absolute difference from the reference over forward outputs and gradients."""
    failures: list[str] = field(default_factory=list)
    """One line per failed comparison: shape, output, error."""

    @property
    def ok(self) -> bool:
        return self.forward and self.gradients is not False and self.deterministic


@dataclass
class SelftestReport:
    """What ``selftest`` found on one device."""

    device: str
    checks: list[OpCheck]
    problem: str | None = None
    """Why nothing could be tested (no extension, no CUDA kernels), else None."""

    @property
    def ok(self) -> bool:
        return self.problem is None and all(c.ok for c in self.checks)

    def table(self) -> str:
        def mark(flag: bool | None) -> str:
            return "-" if flag is None else ("ok" if flag else "FAIL")

        lines = [f"{'op':<17}{'forward':<9}{'gradients':<11}{'deterministic':<15}max |error|"]
        for c in self.checks:
            lines.append(f"{c.op:<17}{mark(c.forward):<9}{mark(c.gradients):<11}{mark(c.deterministic):<15}{c.max_error:.2e}")
            lines.extend(f"    {line}" for line in c.failures)
        return "\n".join(lines)


def _problem(device: torch.device) -> str | None:
    if not ops.HAS_EXTENSION:
        return "the compiled extension is not installed, so there are no kernels to test (make install)"
    if device.type == "cuda" and not (torch.cuda.is_available() and ops.with_cuda()):
        return "CUDA was asked for, but torch sees no GPU or the extension was built without CUDA kernels"
    if device.type not in ("cpu", "cuda"):
        return f"switch_sae has kernels for cpu and cuda, not {device.type}"
    return None


def _sample(shape: tuple, device: torch.device, seed: int) -> dict[str, Any]:
    batch, d_in, n_experts, d_expert, k, n_active, tile_rows, with_b_enc, idle = shape
    g = torch.Generator().manual_seed(seed)

    def randn(*size: int) -> Tensor:
        return torch.randn(*size, generator=g).to(device)

    allowed = torch.tensor([e for e in range(n_experts) if e != idle])
    picks = torch.rand(batch, len(allowed), generator=g).argsort(dim=1)[:, :n_active]  # distinct experts
    rows = batch * n_active
    return {
        "experts": allowed[picks].reshape(-1).to(device), "n_experts": n_experts, "n_active": n_active, "k": k,
        "tile_rows": tile_rows, "x": randn(batch, d_in), "W_enc": randn(n_experts, d_expert, d_in),
        "b_enc": randn(n_experts, d_expert) if with_b_enc else None, "b_dec": randn(d_in),
        "W_dec": randn(n_experts * d_expert, d_in), "grad_values": randn(rows, k), "grad_out": randn(rows, d_in),
    }


def _compare(check: OpCheck, label: str, got: Any, want: Any, gradient: bool = False, exact: bool = False) -> None:
    """Record whether ``got`` matches the reference ``want`` (in the forward or gradients column)."""
    got, want = torch.as_tensor(got).cpu(), torch.as_tensor(want).cpu()
    if got.shape != want.shape or got.dtype != want.dtype:
        failure, error = f"got {got.dtype} {tuple(got.shape)}, reference {want.dtype} {tuple(want.shape)}", float("inf")
    else:
        error = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
        close = torch.equal(got, want) if exact else torch.allclose(got, want, **TOLERANCE)
        failure = None if close else f"max |error| {error:.3e}"
    check.max_error = max(check.max_error, error)
    if failure is not None:
        check.failures.append(f"{label}: {failure}")
        if gradient:
            check.gradients = False
        else:
            check.forward = False


def _twice(check: OpCheck, label: str, run: Callable[[], tuple[Tensor, ...]]) -> tuple[Tensor, ...]:
    """Run twice; results must be bitwise equal (the kernels promise determinism)."""
    first, second = run(), run()
    if not all(torch.equal(a, b) for a, b in zip(first, second)):
        check.deterministic = False
        check.failures.append(f"{label}: two runs on the same inputs differ")
    return first


def _check_dispatch(check: OpCheck, kernels: Any, p: dict[str, Any], label: str) -> None:
    got = _twice(check, label, lambda: kernels.dispatch(p["experts"], p["n_experts"]))
    for name, g, w in zip(("order", "offsets"), got, reference.dispatch(p["experts"], p["n_experts"])):
        _compare(check, f"{label} {name}", g, w, exact=True)


def _check_encode_topk(check: OpCheck, kernels: Any, p: dict[str, Any], label: str) -> None:
    leaves = {n: p[n].clone().requires_grad_(True) for n in ("x", "W_enc", "b_enc", "b_dec") if p[n] is not None}

    def encode_with(fn: Callable) -> tuple[Tensor, ...]:
        for t in leaves.values():
            t.grad = None
        values, indices = fn(leaves["x"], leaves["W_enc"], leaves.get("b_enc"), leaves["b_dec"], p["order"],
                             p["offsets"], p["n_active"], p["k"], p["tile_rows"])
        (values * p["grad_values"]).sum().backward()
        return (values.detach(), indices, *(leaves[n].grad.clone() for n in leaves))

    got = _twice(check, label, lambda: encode_with(kernels.encode_topk))
    names = ("values", "indices", *(f"grad_{n}" for n in leaves))
    for name, g, w in zip(names, got, encode_with(reference.encode_topk)):
        _compare(check, f"{label} {name}", g, w, gradient=name.startswith("grad"), exact=name == "indices")


def _check_encode_backward(check: OpCheck, kernels: Any, p: dict[str, Any], label: str) -> None:
    args = (p["grad_values"], p["values"], p["indices"], p["x"], p["W_enc"], p["b_dec"], p["n_active"])
    got = _twice(check, label, lambda: kernels.encode_backward(*args))
    for name, g, w in zip(("grad_x", "grad_W_enc", "grad_b_enc"), got, reference.encode_backward(*args)):
        _compare(check, f"{label} {name}", g, w)


def _check_decode(check: OpCheck, kernels: Any, p: dict[str, Any], label: str) -> None:
    W_dec = p["W_dec"].clone().requires_grad_(True)
    values = p["values"].clone().requires_grad_(True)

    def decode_with(fn: Callable) -> tuple[Tensor, ...]:
        values.grad = W_dec.grad = None
        out = fn(values, p["indices"], W_dec)
        (out * p["grad_out"]).sum().backward()
        return out.detach(), values.grad.clone(), W_dec.grad.clone()

    got = _twice(check, label, lambda: decode_with(kernels.decode))
    for name, g, w in zip(("out", "grad_values", "grad_W_dec"), got, decode_with(reference.decode)):
        _compare(check, f"{label} {name}", g, w, gradient=name != "out")


def _check_decode_backward(check: OpCheck, kernels: Any, p: dict[str, Any], label: str) -> None:
    args = (p["grad_out"], p["values"], p["indices"], p["W_dec"])
    got = _twice(check, label, lambda: kernels.decode_backward(*args))
    for name, g, w in zip(("grad_values", "grad_W_dec"), got, reference.decode_backward(*args)):
        _compare(check, f"{label} {name}", g, w)


_CHECKS = {
    "dispatch": _check_dispatch,
    "encode_topk": _check_encode_topk,
    "encode_backward": _check_encode_backward,
    "decode": _check_decode,
    "decode_backward": _check_decode_backward,
}


def _run_checks(device: torch.device) -> list[OpCheck]:
    checks = {op: OpCheck(op) for op in _CHECKS}
    checks["encode_topk"].gradients = checks["decode"].gradients = True
    kernels = compiled_ops()
    for number, shape in enumerate(SAMPLE_SHAPES):
        p = _sample(shape, device, seed=number)
        # Every op gets the reference's inputs, so one wrong kernel fails only its own row.
        p["order"], p["offsets"] = reference.dispatch(p["experts"], p["n_experts"])
        p["values"], p["indices"] = reference.encode_topk(
            p["x"], p["W_enc"], p["b_enc"], p["b_dec"], p["order"], p["offsets"], p["n_active"], p["k"], p["tile_rows"]
        )
        label = "shape {} (batch={}, d_in={}, n_experts={}, d_expert={}, k={}, n_active={})".format(number, *shape[:6])
        for op, run in _CHECKS.items():
            try:
                run(checks[op], kernels, p, label)
            except Exception as err:  # a kernel that raises on valid input fails its check
                checks[op].forward = False
                checks[op].failures.append(f"{label}: raised {type(err).__name__}: {err}")
    return list(checks.values())


def selftest(
    device: str | torch.device | None = None, *, verbose: bool = True, file: TextIO | None = None
) -> SelftestReport:
    """Check every compiled op on ``device`` (default: CUDA if present, else CPU) against
    ``reference.py``; print a per-op table to ``file`` (default stdout) unless ``verbose``
    is False, and return the report."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    report = SelftestReport(str(device), [])
    report.problem = _problem(device)
    if report.problem is None:
        report.checks = _run_checks(device)
    if verbose:
        file = file if file is not None else sys.stdout
        print(f"switch_sae selftest on {device} (torch {torch.__version__})", file=file)
        if report.problem is not None:
            print(f"cannot run: {report.problem}", file=file)
        else:
            print(report.table(), file=file)
            verdict = "every op agrees with reference.py" if report.ok else (
                "MISMATCH: do not trust these kernels; SWITCH_SAE_BACKEND=reference runs the PyTorch twins")
            print(verdict, file=file)
    return report
