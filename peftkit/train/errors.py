"""Errors that stop a training run: ``from peftkit.train import TrainingDivergedError``.

Each derives from :class:`peftkit.errors.PeftkitError` (the command line prints them as one line) and from
the closest built-in exception, so generic handlers keep working.
"""

from __future__ import annotations

from peftkit.core.errors import PeftkitError

__all__ = ["NonFiniteGradientError", "NonFiniteLossError", "TrainingDivergedError", "TrainingError"]


class TrainingError(PeftkitError, RuntimeError):
    """A training run stopped because its numbers went bad (non-finite loss or gradients, divergence)."""


class NonFiniteLossError(TrainingError, FloatingPointError):
    """The training loss became NaN or infinite; raised before the bad update is applied."""


class NonFiniteGradientError(TrainingError, FloatingPointError):
    """The loss is finite but some gradients are NaN or infinite; raised before the optimizer step, so the
    parameters keep the values of the last good step."""


class TrainingDivergedError(TrainingError):
    """The loss stayed far above its starting value for several windows of steps (see
    :class:`~peftkit.train.TrainConfig`'s ``divergence_*`` settings)."""
