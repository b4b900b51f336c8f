"""Compile-only check of the CUDA build, for machines without a GPU.

Builds the extension with its CUDA kernels against a CUDA build of torch living in
another Python (``SWITCH_SAE_CUDA_PYTHON``, e.g. a venv made with
``pip install torch==2.14.1 numpy scikit-build-core ninja cmake``), then, in that
Python: loads the built ``_C`` module on this GPU-less machine, asks the dispatcher
whether every op has a CUDA kernel, checks ``with_cuda()``, and lists the embedded GPU
architectures with ``cuobjdump --list-elf``. Also builds the same torch without CUDA
kernels (``SWITCH_SAE_CUDA=OFF``, as where nvcc is missing) and loads that; that second
compile is marked ``install`` and runs under ``make test-install``.

Environment:
    SWITCH_SAE_CUDA_PYTHON     python with a CUDA torch (required, else skipped).
    SWITCH_SAE_CUDA_BUILD_DIR  build directory to create or reuse (default: a fresh
                               temporary one). Reusing one makes a second run a no-op
                               rebuild, so CI compiles once.

What it leaves out: running any kernel (that needs a GPU: tests/test_ops_cuda.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cuda_build

ROOT = Path(__file__).resolve().parents[1]
OPS = ("dispatch", "encode_topk", "encode_backward", "decode", "decode_backward")
# One kernel template per shared primitive and per op-specific step: if a .cu file
# silently dropped out of the build, its kernels would be missing from the binary.
KERNELS = (
    "histogram_kernel",
    "gather_sum_kernel",
    "feature_sum_kernel",
    "gather_centered_kernel",
    "finish_preactivations_kernel",
    "tile_ends_kernel",
    "scatter_topk_kernel",
    "select_topk_kernel",
    "check_routing_kernel",
)
# Dispatch keys every op has a kernel for: the backends, and the autocast kernels
# (csrc/autocast.cpp) that run the ops in their inputs' dtype.
KEYS = ("CPU", "CUDA", "AutocastCPU", "AutocastCUDA")
DEFAULT_ARCHS = ("sm_80", "sm_90")  # cmake/cuda.cmake's TORCH_CUDA_ARCH_LIST default


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def cuda_python() -> str:
    python = os.environ.get("SWITCH_SAE_CUDA_PYTHON")
    if not python:
        pytest.skip(
            "SWITCH_SAE_CUDA_PYTHON is not set: point it at a python whose torch is a CUDA "
            "build (e.g. a venv with `pip install torch==2.14.1 numpy scikit-build-core ninja cmake`)"
        )
    if not Path(python).is_file():
        pytest.skip(f"SWITCH_SAE_CUDA_PYTHON={python} does not exist")
    # Absolute (CMake resolves a relative Python_EXECUTABLE against the build folder), but
    # not resolved through symlinks, which would leave the venv.
    python = os.path.abspath(python)
    probe = run([python, "-c", "import torch; print(torch.version.cuda or '')"])
    if probe.returncode != 0 or not probe.stdout.strip():
        pytest.skip(f"{python} has no CUDA build of torch: {probe.stdout.strip()} {probe.stderr[-300:]}")
    if find_nvcc() is None:
        pytest.skip("no nvcc found (PATH, CUDACXX or /usr/local/cuda/bin): cannot compile CUDA")
    return python


def tool(python: str, name: str) -> str | None:
    """A build tool installed beside ``python`` (its venv), else one on PATH."""
    beside = Path(python).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


@pytest.fixture(scope="module")
def build(cuda_python, tmp_path_factory) -> dict:
    """Configure (if needed) and build; returns the .so path, log and wall time."""
    given = os.environ.get("SWITCH_SAE_CUDA_BUILD_DIR")
    build_dir = Path(given).resolve() if given else tmp_path_factory.mktemp("cuda_build")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}  # test the default
    cmake = tool(cuda_python, "cmake")
    assert cmake, "cmake not found beside SWITCH_SAE_CUDA_PYTHON nor on PATH"
    log = []
    start = time.monotonic()
    # A configure that failed half-way leaves a CMakeCache.txt but no build files.
    if not any((build_dir / name).is_file() for name in ("build.ninja", "Makefile")):
        configure = [cmake, "-S", str(ROOT), "-B", str(build_dir), f"-DPython_EXECUTABLE={cuda_python}",
                     "-DCMAKE_BUILD_TYPE=Release", "-DSWITCH_SAE_CUDA=ON"]
        ninja = tool(cuda_python, "ninja")
        if ninja:
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        done = run(configure, env=env)
        log.append(done.stdout + done.stderr)
        assert done.returncode == 0, "CUDA configure failed:\n" + "".join(log)[-5000:]
    done = run([cmake, "--build", str(build_dir), "-j", "2"], env=env)
    log.append(done.stdout + done.stderr)
    seconds = time.monotonic() - start
    assert done.returncode == 0, "CUDA build failed:\n" + "".join(log)[-8000:]
    libraries = sorted(build_dir.glob("_C*.so"))
    assert len(libraries) == 1, f"expected one _C*.so in {build_dir}, found {libraries}"
    print(f"\nCUDA configure + build took {seconds:.0f} s in {build_dir}")
    return {"so": libraries[0], "log": "".join(log), "seconds": seconds, "dir": build_dir}


def test_build_has_no_warnings_in_our_sources(build):
    # Warnings from compiling our .cpp/.cu files (host compiler, nvcc front end, ptxas
    # spills). A reused build directory only shows what this run recompiled.
    lines = build["log"].splitlines()
    ours = [
        line for line in lines
        if "warning" in line.lower() and ("csrc/" in line or "ptxas" in line)
    ]
    assert not ours, "warnings while compiling our sources:\n" + "\n".join(ours)


def test_extension_loads_without_gpu_and_registers_cuda_kernels(build, cuda_python):
    # Load the .so directly (the package's Python dependencies need not be in that
    # environment): importing it runs the TORCH_LIBRARY registrations.
    script = f"""
import importlib.util, json, torch
spec = importlib.util.spec_from_file_location("switch_sae._C", {str(build["so"])!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
has = torch._C._dispatch_has_kernel_for_dispatch_key
print(json.dumps({{
    "module_with_cuda": module.with_cuda(),
    "op_with_cuda": torch.ops.switch_sae.with_cuda(),
    "built_against": module.torch_version_built(),
    "torch": torch.__version__,
    "kernels": {{op: {{key: has("switch_sae::" + op, key) for key in {KEYS!r}}} for op in {OPS!r}}},
}}))
"""
    done = run([cuda_python, "-c", script], cwd=build["dir"])
    assert done.returncode == 0, done.stderr[-5000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["module_with_cuda"] is True
    assert facts["op_with_cuda"] is True
    assert facts["built_against"] == facts["torch"]
    for op, keys in facts["kernels"].items():
        assert keys == dict.fromkeys(KEYS, True), f"{op}: {keys}"


def find_cuobjdump(cuda_python: str) -> str | None:
    """cuobjdump from the toolkit, or from a wheel of the CUDA Python (triton ships one)."""
    nvcc = find_nvcc()
    candidates = [shutil.which("cuobjdump"), str(Path(nvcc).resolve().parent / "cuobjdump") if nvcc else None]
    site = run([cuda_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    if site:
        candidates += [f"{site}/nvidia/cu13/bin/cuobjdump", f"{site}/triton/backends/nvidia/bin/cuobjdump"]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def test_binary_embeds_sm80_and_sm90_and_every_kernel(build, cuda_python):
    cuobjdump = find_cuobjdump(cuda_python)
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit bin, or the CUDA python's nvidia/triton wheels)")
    listing = run([cuobjdump, "--list-elf", str(build["so"])])
    assert listing.returncode == 0, listing.stderr
    print("\n" + listing.stdout)
    for arch in DEFAULT_ARCHS:
        assert f".{arch}." in listing.stdout, f"{arch} missing from:\n{listing.stdout}"
    symbols = run([cuobjdump, "--dump-elf-symbols", str(build["so"])])
    assert symbols.returncode == 0, symbols.stderr
    for kernel in KERNELS:
        assert kernel in symbols.stdout, f"{kernel} is not in the binary"


@pytest.mark.install  # a second full compile: run by `make test-install`, not `make test`
def test_cuda_torch_without_cuda_kernels_builds_and_loads(cuda_python, tmp_path):
    # The common case of a CUDA build of torch where no CUDA kernels are compiled (no nvcc,
    # or SWITCH_SAE_CUDA=OFF from the environment as here): torch's CMake config would
    # demand the CUDA toolkit, so the build must not depend on it.
    cmake = tool(cuda_python, "cmake")
    env = {**os.environ, "SWITCH_SAE_CUDA": "off"}
    done = run([cmake, "-S", str(ROOT), "-B", str(tmp_path), f"-DPython_EXECUTABLE={cuda_python}",
                "-DCMAKE_BUILD_TYPE=Release"], env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    assert "CUDA kernels: OFF" in done.stdout
    assert "CMAKE_CUDA_COMPILER:" not in (tmp_path / "CMakeCache.txt").read_text()
    done = run([cmake, "--build", str(tmp_path), "-j", "2"], env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-8000:]
    (library,) = tmp_path.glob("_C*.so")
    script = f"""
import importlib.util, torch
spec = importlib.util.spec_from_file_location("switch_sae._C", {str(library)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
has = torch._C._dispatch_has_kernel_for_dispatch_key
print(module.with_cuda(), all(has("switch_sae::" + op, "CPU") for op in {OPS!r}),
      any(has("switch_sae::" + op, "CUDA") for op in {OPS!r}))
"""
    loaded = run([cuda_python, "-c", script], cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-5000:]
    assert loaded.stdout.split() == ["False", "True", "False"]
