"""Training SAEs: the paper's recipe (``Trainer``, ``TrainConfig``), losses and checkpoints."""

from .checkpoint import CheckpointError
from .config import TrainConfig
from .init import geometric_median
from .metrics import StepMetrics
from .trainer import Trainer

__all__ = ["CheckpointError", "StepMetrics", "TrainConfig", "Trainer", "geometric_median"]
