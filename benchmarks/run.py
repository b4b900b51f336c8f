"""Run the switch_sae benchmarks: ``python benchmarks/run.py [--quick] [--help]``.

A thin entry point; the runner lives in ``switch_sae.bench`` so that the installed
``switch-sae bench`` command runs the very same code.
"""

import sys
from pathlib import Path

try:
    import switch_sae  # noqa: F401
except ImportError:  # running from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from switch_sae.bench import main

if __name__ == "__main__":
    main()
