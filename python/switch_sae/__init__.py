"""switch_sae: wide, cheap sparse autoencoders with routed experts.

``import switch_sae`` loads the compiled custom ops (``torch.ops.switch_sae.*``) when the
extension is installed, and falls back to the plain PyTorch reference otherwise.
"""

from . import ops, reference
from .models import SAE, ForwardOutput, SparseCode, SwitchSAE, SwitchSAEConfig

__version__ = "0.1.0"

__all__ = [
    "SAE",
    "ForwardOutput",
    "SparseCode",
    "SwitchSAE",
    "SwitchSAEConfig",
    "ops",
    "reference",
    "__version__",
]
