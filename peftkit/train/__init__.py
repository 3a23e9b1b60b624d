"""Training: a small :class:`Trainer` (AdamW, schedules, accumulation, clipping, eval, checkpoints, callbacks)
and the sentence-classification task the demo and the CLI use (:mod:`peftkit.train.tasks`)."""

from peftkit.train.trainer import (
    Callback,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    TrainResult,
    lr_factor,
    seed_everything,
)

__all__ = [
    "Callback",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "lr_factor",
    "seed_everything",
]
