#!/usr/bin/env bash
# Run tests/test_interop.py with SAELens installed, without touching the main environment.
#
# sae-lens 6.x requires transformer-lens < 4, while switch_sae's harvesting uses TransformerLens 4
# (TransformerBridge). So SAELens gets its own overlay venv: it sees every package of the main
# venv (switch_sae included) through a .pth line placed after its own site-packages, and pip
# installs only what SAELens adds or needs in another version (transformer-lens 3.x) on top.
#
#   scripts/test_interop.sh [MAIN_VENV=.venv] [OVERLAY_VENV=.venv-interop]
set -euo pipefail
cd "$(dirname "$0")/.."
main_venv=${1:-.venv}
overlay=${2:-.venv-interop}
main_py="$main_venv/bin/python"
if [ ! -x "$overlay/bin/python" ]; then
  "$main_py" -m venv "$overlay"
fi
site() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
site "$main_py" > "$(site "$overlay/bin/python")/zz_main_venv.pth"
"$overlay/bin/python" -m pip install --quiet "sae-lens>=6.0,<7"
"$overlay/bin/python" -c 'import sae_lens, transformer_lens; print("sae_lens", sae_lens.__version__)'
exec "$overlay/bin/python" -m pytest -q tests/test_interop.py
