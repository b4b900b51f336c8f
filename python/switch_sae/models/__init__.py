"""SAE architectures behind one interface (``SAE``): Switch and the baselines."""

from .base import SAE, ForwardOutput, SparseCode
from .switch import SwitchSAE, SwitchSAEConfig

__all__ = ["SAE", "ForwardOutput", "SparseCode", "SwitchSAE", "SwitchSAEConfig"]
