#!/usr/bin/env bash
# One command for the first run on a GPU: is every CUDA kernel right, clean and fast?
#
#   benchmarks/gpu_check.sh            # uses .venv/bin/python; or PYTHON=/path/to/python
#
# Needs a CUDA GPU, a torch with CUDA, switch_sae installed with its CUDA kernels
# (`make install` on the GPU machine) and compute-sanitizer (part of the CUDA toolkit).
# Steps, each with a time limit so the whole check stays under 10 minutes; the first
# failure stops it with a message saying which step failed:
#   1. switch-sae selftest --device cuda    every op against reference.py
#   2. pytest tests/test_ops_cuda.py tests/test_ops.py
#   3. compute-sanitizer memcheck, then racecheck, on the CUDA op tests
#   4. the GPU benchmark (benchmarks/gpu_step.py): validates, then times a training step
# Results of step 4 go to benchmarks/results/gpu_step.json.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"

fail() {
    echo "gpu_check: FAILED: $*" >&2
    exit 1
}

refuse() {
    echo "gpu_check: cannot run: $*" >&2
    exit 2
}

step() {  # step NAME SECONDS COMMAND...
    local name="$1" seconds="$2"
    shift 2
    echo "== gpu_check: $name (limit ${seconds}s)"
    local start=$SECONDS status=0
    timeout --kill-after=10 "$seconds" "$@" || status=$?
    if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
        fail "$name took longer than ${seconds}s"
    elif [ "$status" -ne 0 ]; then
        fail "$name (exit code $status)"
    fi
    echo "== gpu_check: $name passed in $((SECONDS - start))s"
}

[ -x "$PYTHON" ] || refuse "no Python at $PYTHON (run make install, or set PYTHON=)"
"$PYTHON" - <<'PY' || refuse "no CUDA GPU to check (see the message above); run this on a machine with one"
import sys
import torch
import switch_sae
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA GPU (built with CUDA {torch.version.cuda})")
if not switch_sae.ops.with_cuda():
    sys.exit("switch_sae was installed without CUDA kernels: reinstall it where nvcc is found (make install)")
print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
command -v compute-sanitizer >/dev/null || refuse "compute-sanitizer is not on PATH (it ships with the CUDA toolkit)"

PYTEST=("$PYTHON" -m pytest -x -q -p no:cacheprovider)
# Under the sanitizers: the CUDA op tests minus those that trip device asserts on purpose
# (a sanitizer rightly reports those) and minus torch.compile (minutes of compiling, no
# new kernels).
SANITIZED=(tests/test_ops_cuda.py -k "not device_assert and not compile")

step "selftest" 60 "$PYTHON" -m switch_sae selftest --device cuda
step "op tests" 240 "${PYTEST[@]}" tests/test_ops_cuda.py tests/test_ops.py
step "memcheck" 120 compute-sanitizer --tool memcheck --error-exitcode 1 --target-processes all \
    "${PYTEST[@]}" "${SANITIZED[@]}"
step "racecheck" 120 compute-sanitizer --tool racecheck --error-exitcode 1 --target-processes all \
    "${PYTEST[@]}" "${SANITIZED[@]}"
step "GPU benchmark" 60 "$PYTHON" benchmarks/gpu_step.py --out benchmarks/results/gpu_step.json
echo "gpu_check: all steps passed"
