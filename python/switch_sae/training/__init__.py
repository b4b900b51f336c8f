"""Training SAEs: the paper's recipe (``Trainer``, ``TrainConfig``), optimisers and checkpoints."""

from .checkpoint import CheckpointError
from .config import TrainConfig
from .init import geometric_median
from .metrics import StepMetrics
from .optim import OPTIMIZERS, SignSGD
from .trainer import Trainer

__all__ = ["CheckpointError", "OPTIMIZERS", "SignSGD", "StepMetrics", "TrainConfig", "Trainer", "geometric_median"]
