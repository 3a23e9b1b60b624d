"""Training: a small :class:`Trainer` (AdamW, schedules, accumulation, clipping, eval, full checkpoints that
resume exactly, callbacks), the ``classify`` and ``causal-lm`` tasks on a user's data
(:mod:`peftkit.train.classify`, :mod:`peftkit.train.causal_lm`) and the run folders of ``peftkit train``
(:mod:`peftkit.train.run`)."""

from peftkit.train.config import TrainConfig, lr_factor
from peftkit.train.errors import (
    CheckpointError,
    DataError,
    NonFiniteGradientError,
    NonFiniteLossError,
    TrainingDivergedError,
    TrainingError,
    TrainingInterrupted,
)
from peftkit.train.helpers import seed_everything
from peftkit.train.trainer import Callback, Trainer, TrainResult

__all__ = [
    "Callback",
    "CheckpointError",
    "DataError",
    "NonFiniteGradientError",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingDivergedError",
    "TrainingError",
    "TrainingInterrupted",
    "lr_factor",
    "seed_everything",
]
