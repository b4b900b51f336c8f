"""Run the switch_sae benchmarks: ``python benchmarks/run.py [--quick] [--help]``.

The same as ``switch-sae bench``; the runner is this folder's ``benchmarks`` package.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the folder holding the benchmarks package
try:
    import switch_sae  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(ROOT / "python"))

from benchmarks import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="run.py"))
