"""SAE architectures behind one interface (``SAE``): Switch and the baselines."""

from .base import SAE, ForwardOutput, SAEConfig, SparseCode, architectures
from .batchtopk import BatchTopKSAE, BatchTopKSAEConfig
from .gated import GatedSAE, GatedSAEConfig
from .jumprelu import JumpReLUSAE, JumpReLUSAEConfig
from .relu import ReLUSAE, ReLUSAEConfig
from .switch import SwitchSAE, SwitchSAEConfig
from .topk import TopKSAE, TopKSAEConfig

__all__ = [
    "SAE",
    "SAEConfig",
    "ForwardOutput",
    "SparseCode",
    "SwitchSAE",
    "SwitchSAEConfig",
    "TopKSAE",
    "TopKSAEConfig",
    "BatchTopKSAE",
    "BatchTopKSAEConfig",
    "ReLUSAE",
    "ReLUSAEConfig",
    "GatedSAE",
    "GatedSAEConfig",
    "JumpReLUSAE",
    "JumpReLUSAEConfig",
    "architectures",
]
