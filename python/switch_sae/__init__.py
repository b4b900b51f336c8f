"""switch_sae: wide, cheap sparse autoencoders with routed experts.

``import switch_sae`` loads the compiled custom ops (``torch.ops.switch_sae.*``) when the
extension is installed, and falls back to the plain PyTorch reference otherwise.
"""

from . import models, ops, reference
from .models import (
    SAE,
    BatchTopKSAE,
    BatchTopKSAEConfig,
    ForwardOutput,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    ReLUSAE,
    ReLUSAEConfig,
    SAEConfig,
    SparseCode,
    SwitchSAE,
    SwitchSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    architectures,
)
from .self_test import selftest
from .training import StepMetrics, TrainConfig, Trainer

__version__ = "0.1.0"

__all__ = [
    *models.__all__,
    "StepMetrics",
    "TrainConfig",
    "Trainer",
    "ops",
    "reference",
    "selftest",
    "__version__",
]
