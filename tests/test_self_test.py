"""The self-test, the reference backend switch, and the GPU check script (on the CPU).

``switch_sae.selftest()`` must pass on the real kernels and fail, naming the op, when a
kernel is deliberately wrong or nondeterministic; ``switch-sae selftest`` exits non-zero
then. ``SWITCH_SAE_BACKEND=reference`` / ``ops.set_backend`` / ``ops.use_backend`` must
send every model through the PyTorch twins. ``benchmarks/gpu_check.sh`` must parse, and
refuse clearly without a GPU; ``benchmarks/gpu_step.py`` must validate and run on the CPU.

What it leaves out: the CUDA kernels themselves (tests/test_ops_cuda.py, on a GPU).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import switch_sae
from switch_sae import SwitchSAE, SwitchSAEConfig, ops, reference
from switch_sae.cli import main

self_test = sys.modules["switch_sae.self_test"]
ROOT = Path(__file__).resolve().parents[1]
needs_extension = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="the compiled extension is not installed")


@needs_extension
def test_selftest_passes_on_the_cpu_kernels():
    out = io.StringIO()
    report = switch_sae.selftest("cpu", file=out)
    assert report.ok, out.getvalue()
    assert [c.op for c in report.checks] == ["dispatch", "encode_topk", "encode_backward", "decode", "decode_backward"]
    assert report.checks[1].gradients and report.checks[3].gradients  # the ops with autograd
    text = out.getvalue()
    assert "every op agrees with reference.py" in text and "FAIL" not in text


def kernels_with(**overrides) -> types.SimpleNamespace:
    real = torch.ops.switch_sae
    names = ("dispatch", "encode_topk", "encode_backward", "decode", "decode_backward")
    return types.SimpleNamespace(**{n: getattr(real, n) for n in names} | overrides)


@needs_extension
def test_selftest_detects_a_wrong_kernel(monkeypatch):
    def wrong_decode(values, indices, W_dec):
        return torch.ops.switch_sae.decode(values, indices, W_dec) * 1.001  # 0.1% off

    monkeypatch.setattr(self_test, "compiled_ops", lambda: kernels_with(decode=wrong_decode))
    out = io.StringIO()
    report = switch_sae.selftest("cpu", file=out)
    assert not report.ok
    bad = {c.op: c for c in report.checks if not c.ok}
    assert list(bad) == ["decode"] and not bad["decode"].forward and bad["decode"].gradients is False
    assert "MISMATCH" in out.getvalue() and "decode" in out.getvalue()
    assert main(["selftest", "--device", "cpu"]) == 1


@needs_extension
def test_selftest_detects_nondeterminism_and_exceptions(monkeypatch):
    def noisy_backward(grad_out, values, indices, W_dec):
        grad_values, grad_W_dec = torch.ops.switch_sae.decode_backward(grad_out, values, indices, W_dec)
        return grad_values, grad_W_dec + torch.rand(()) * 1e-7  # below tolerance, not bitwise stable

    def broken_dispatch(experts, n_experts):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(self_test, "compiled_ops",
                        lambda: kernels_with(decode_backward=noisy_backward, dispatch=broken_dispatch))
    report = switch_sae.selftest("cpu", verbose=False)
    checks = {c.op: c for c in report.checks}
    assert checks["decode_backward"].forward and not checks["decode_backward"].deterministic
    assert not checks["dispatch"].forward and "kernel launch failed" in checks["dispatch"].failures[0]
    assert checks["encode_topk"].ok and checks["decode"].ok


def test_selftest_refuses_a_device_it_cannot_test(capsys):
    report = switch_sae.selftest("meta" if ops.HAS_EXTENSION else "cpu")
    assert not report.ok and report.problem
    assert "cannot run" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert main(["selftest", "--device", "cuda"]) == 1


# -- backend switch -------------------------------------------------------------------------


def test_use_backend_routes_models_to_the_reference(monkeypatch):
    calls = []
    real = reference.decode
    monkeypatch.setattr(reference, "decode", lambda *a: (calls.append(1), real(*a))[1])
    torch.manual_seed(0)
    model = SwitchSAE(SwitchSAEConfig(d_in=8, n_experts=2, d_expert=8, k=3))
    x = torch.randn(5, 8)
    with ops.use_backend("reference"):
        assert ops.get_backend() == "reference"
        out_ref = model(x).x_hat
    assert calls and ops.get_backend() == "extension"
    calls.clear()
    out = model(x).x_hat
    assert bool(calls) == (not ops.HAS_EXTENSION)  # the compiled op when it exists
    torch.testing.assert_close(out, out_ref)
    ops.set_backend("reference")
    try:
        model(x)
        assert calls
    finally:
        ops.set_backend("extension")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_backend("cuda")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_backend_environment_variable():
    code = (
        "import torch, switch_sae\n"
        "from switch_sae import ops, reference\n"
        "calls = []\n"
        "real = reference.dispatch\n"
        "reference.dispatch = lambda *a: (calls.append(1), real(*a))[1]\n"
        "ops.dispatch(torch.tensor([1, 0, 1]), 2)\n"
        "print(ops.get_backend(), len(calls))\n"
    )
    done = run_python(code, SWITCH_SAE_BACKEND="reference")
    assert done.returncode == 0 and done.stdout.split() == ["reference", "1"], done.stderr
    done = run_python("import switch_sae", SWITCH_SAE_BACKEND="fast")
    assert done.returncode != 0 and "SWITCH_SAE_BACKEND must be one of" in done.stderr


# -- the GPU check ---------------------------------------------------------------------------


def test_gpu_check_script_parses_and_refuses_without_a_gpu():
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    if shutil.which("shellcheck"):
        done = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, done.stdout
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal cannot be observed here")
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2
    assert "gpu_check: cannot run: no CUDA GPU" in done.stderr and "sees no CUDA GPU" in done.stderr
    assert "selftest" not in done.stdout  # refused before the first step
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": "/nonexistent/python"})
    assert done.returncode == 2 and "no Python at /nonexistent/python" in done.stderr


@needs_extension
def test_gpu_benchmark_validates_and_runs_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_step.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_step.py"), "--device", "cpu", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    records = json.loads(out.read_text())
    assert [r["backend"] for r in records] == ["extension", "reference"]
    assert all(r["median_ms"] > 0 and r["device"] == "cpu" for r in records)
