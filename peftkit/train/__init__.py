"""Training: a small :class:`Trainer` (AdamW, schedules, accumulation, clipping, eval, checkpoints, callbacks)
and the sentence-classification task the demo and the CLI use (:mod:`peftkit.train.tasks`)."""

from peftkit.train.errors import NonFiniteGradientError, NonFiniteLossError, TrainingDivergedError, TrainingError
from peftkit.train.trainer import (
    Callback,
    TrainConfig,
    Trainer,
    TrainResult,
    lr_factor,
    seed_everything,
)

__all__ = [
    "Callback",
    "NonFiniteGradientError",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingDivergedError",
    "TrainingError",
    "lr_factor",
    "seed_everything",
]
