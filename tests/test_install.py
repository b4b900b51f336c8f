"""``pip install <checkout>`` as users type it, in new virtual environments.

Each case makes a venv in a temporary folder, copies the source tree there (a clean
checkout: no build folder, no installed extension), runs exactly ``pip install <checkout>``
(pip's defaults: an isolated build), and then, in that venv: imports ``switch_sae``,
checks ``switch_sae.ops.HAS_EXTENSION``, checks that the extension was built against the
venv's own torch (same version, same files), and runs the custom-op snippet of the README
against the plain PyTorch reference ops.

- (a) a fresh venv: pip brings torch, both for the build and for the install;
- (b) CPU torch 2.13.0 installed first: the extension is built against it, no CUDA;
- (c) CUDA torch 2.14.1 installed first, nvcc on PATH: built against it, with the CUDA
  kernels compiled in (checked through the dispatcher; nothing runs on a GPU);
- ``python -m build`` makes an sdist and a wheel; the wheel installs in a fresh venv.

These install torch and compile the extension, minutes apiece: marked ``install``, left
out of ``make test`` and run by ``make test-install``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[1]
OPS = ("dispatch", "encode_topk", "encode_backward", "decode", "decode_backward")
CPU_TORCH = "torch==2.13.0"  # the CPU build the Makefile installs (a file on this machine kind)
CUDA_TORCH = "torch==2.14.1"  # the CUDA build the Makefile's CUDA venv installs

# Run inside the new venv: inputs for the README snippet, the snippet itself, then the
# same computation with the reference ops. Prints one JSON line of facts to assert on.
CHECK = r"""
import json, pathlib, sys
import torch
import switch_sae
from switch_sae import _build_info, ops, reference

torch.manual_seed(0)
batch, d_in, n_experts, d_expert, k, n_active = 64, 32, 4, 16, 8, 1
x = torch.randn(batch, d_in)
W_enc = torch.randn(n_experts, d_expert, d_in) / d_in**0.5
W_dec_flat = torch.randn(n_experts * d_expert, d_in)
b_dec = torch.randn(d_in) / 10
experts = torch.randint(0, n_experts, (batch, n_active))
gates = torch.rand(batch, n_active)
scope = dict(locals())
exec(sys.argv[1], scope)

order, offsets = reference.dispatch(experts.flatten(), n_experts)
values, indices = reference.encode_topk(x, W_enc, None, b_dec, order, offsets, n_active, k, 1024)
expected = reference.decode(values * gates, indices, W_dec_flat) + b_dec
torch.testing.assert_close(scope["x_hat"], expected)

has = torch._C._dispatch_has_kernel_for_dispatch_key
print(json.dumps({
    "has_extension": ops.HAS_EXTENSION,
    "built_against": _build_info.TORCH_VERSION,
    "torch": torch.__version__,
    "torch_cuda": torch.version.cuda,
    "torch_dir": str(pathlib.Path(torch.__file__).parent),
    "package_dir": str(pathlib.Path(switch_sae.__file__).parent),
    "with_cuda": ops.with_cuda(),
    "cuda_kernels": {op: has("switch_sae::" + op, "CUDA") for op in ops_names},
}))
""".replace("ops_names", repr(OPS))


def readme_op_snippet() -> str:
    """The first python block under the README's custom-ops heading."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### The custom ops") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)


def user_env(venv_dir: Path) -> dict:
    """The environment of a user with ``venv_dir`` activated: none of the test run's own."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SWITCH_SAE_", "PYTHON", "VIRTUAL_ENV", "SKBUILD_", "CMAKE_"))
           or k == "CMAKE_BUILD_PARALLEL_LEVEL"}  # how many compilers this machine can afford
    env["VIRTUAL_ENV"] = str(venv_dir)
    env["PATH"] = f"{venv_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def make_venv(folder: Path) -> Path:
    venv.EnvBuilder(with_pip=True).create(folder)
    return folder


def pip(venv_dir: Path, *args: str, cwd: Path) -> float:
    """Run ``pip <args>`` in the venv; returns the wall time, fails with pip's output."""
    start = time.monotonic()
    done = run([venv_dir / "bin" / "pip", *args], cwd=cwd, env=user_env(venv_dir))
    seconds = time.monotonic() - start
    assert done.returncode == 0, (f"pip {' '.join(args)} failed ({free_disk(cwd)}):\n"
                                  f"{(done.stdout + done.stderr)[-8000:]}")
    return seconds


def free_disk(folder: Path) -> str:
    """Free space where the venvs live and where pip unpacks: each CUDA torch takes ~5.5 GB."""
    places = {os.stat(p).st_dev: p for p in (Path(tempfile.gettempdir()), folder)}  # one per disk
    return ", ".join(f"{shutil.disk_usage(p).free / 2**30:.1f} GiB free in {p}" for p in places.values())


def checkout(folder: Path) -> Path:
    """A copy of the source tree as a fresh clone has it (no builds, venvs or outputs)."""
    dst = folder / "switch_sae"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "runs", "cache", "__pycache__", "*.so",
        "_build_info.py", "*.egg-info", ".pytest_cache", "results"))
    return dst


def installed_facts(venv_dir: Path, cwd: Path) -> dict:
    """Import the installed package in the venv and run the README snippet (CHECK)."""
    done = run([venv_dir / "bin" / "python", "-c", CHECK, readme_op_snippet()], cwd=cwd,
               env=user_env(venv_dir))
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_built_for_own_torch(facts: dict, venv_dir: Path) -> None:
    assert facts["has_extension"] is True
    assert facts["built_against"] == facts["torch"]
    assert Path(facts["package_dir"]).is_relative_to(venv_dir), facts["package_dir"]


@pytest.fixture
def scratch(tmp_path):
    """A temporary folder removed afterwards: its venvs hold GBs (pytest keeps old tmp_path folders)."""
    print(f"\nbefore: {free_disk(tmp_path)}")
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def nvcc_available() -> bool:
    return shutil.which("nvcc") is not None


def test_fresh_venv(scratch):
    venv_dir = make_venv(scratch / "venv")
    source = checkout(scratch)
    seconds = pip(venv_dir, "install", str(source), cwd=scratch)
    facts = installed_facts(venv_dir, scratch)
    print(f"\n(a) fresh venv: pip install took {seconds:.0f} s; torch {facts['torch']}, "
          f"CUDA kernels: {facts['with_cuda']}")
    assert_built_for_own_torch(facts, venv_dir)
    assert Path(facts["torch_dir"]).is_relative_to(venv_dir)
    # With a CUDA build of torch (what pip brings here) and nvcc, the kernels are compiled in.
    assert facts["with_cuda"] is (facts["torch_cuda"] is not None and nvcc_available())


def install_over_users_torch(scratch: Path, torch_spec: str, case: str) -> dict:
    """Install ``torch_spec`` in a new venv, then the checkout; the facts of what runs."""
    venv_dir = make_venv(scratch / "venv")
    pip(venv_dir, "install", torch_spec, cwd=scratch)
    users_torch = run([venv_dir / "bin" / "python", "-c", "import torch; print(torch.__version__)"]).stdout.strip()
    seconds = pip(venv_dir, "install", str(checkout(scratch)), cwd=scratch)
    facts = installed_facts(venv_dir, scratch)
    print(f"\n({case}) venv with torch {users_torch}: pip install took {seconds:.0f} s")
    assert_built_for_own_torch(facts, venv_dir)
    assert facts["torch"] == users_torch  # nothing replaced the user's torch
    assert Path(facts["torch_dir"]).is_relative_to(venv_dir)
    return facts


def test_venv_with_cpu_torch(scratch):
    facts = install_over_users_torch(scratch, CPU_TORCH, "b")
    assert facts["torch_cuda"] is None, "expected the CPU build of torch"
    assert facts["with_cuda"] is False
    assert not any(facts["cuda_kernels"].values())


@pytest.mark.skipif(not nvcc_available(), reason="no nvcc on PATH: the CUDA kernels cannot compile")
def test_venv_with_cuda_torch_and_nvcc(scratch):
    facts = install_over_users_torch(scratch, CUDA_TORCH, "c")
    assert facts["torch_cuda"] is not None, "expected a CUDA build of torch"
    assert facts["with_cuda"] is True
    assert all(facts["cuda_kernels"].values()), facts["cuda_kernels"]


def test_sdist_and_wheel(scratch):
    """``python -m build``: the sdist holds what the build needs (the wheel is built from
    it), and the wheel installs and runs in a fresh venv. Built against the CPU torch
    (a pip constraint, as a user would pin it) so that the wheel installs that torch."""
    build_venv = make_venv(scratch / "build-venv")
    pip(build_venv, "install", "build", cwd=scratch)
    source = checkout(scratch)
    constraints = scratch / "constraints.txt"
    constraints.write_text(CPU_TORCH + "\n")
    env = user_env(build_venv) | {"PIP_CONSTRAINT": str(constraints)}
    dist = scratch / "dist"
    done = run([build_venv / "bin" / "python", "-m", "build", "--outdir", dist, source], env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-8000:]
    sdists, wheels = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(dist.iterdir())
    with tarfile.open(sdists[0]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for needed in ("pyproject.toml", "CMakeLists.txt", "cmake/cuda.cmake",
                   "build_backend/switch_sae_build.py", "csrc/registration.cpp",
                   "python/switch_sae/_build_info.py.in", "README.md"):
        assert needed in names, f"{needed} missing from the sdist"

    venv_dir = make_venv(scratch / "venv")
    pip(venv_dir, "install", str(wheels[0]), cwd=scratch)
    facts = installed_facts(venv_dir, scratch)
    assert_built_for_own_torch(facts, venv_dir)  # the wheel's pin brought the CPU torch
    assert facts["torch_cuda"] is None
