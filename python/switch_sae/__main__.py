"""``python -m switch_sae``: the same as the ``switch-sae`` command."""

import sys

from .cli import main

sys.exit(main())
