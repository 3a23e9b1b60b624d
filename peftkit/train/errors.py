"""Errors of training runs: ``from peftkit.train import TrainingDivergedError``.

Each derives from :class:`peftkit.errors.PeftkitError` (the command line prints them as one line) and from
the closest built-in exception, so generic handlers keep working.
"""

from __future__ import annotations

from peftkit.core.errors import PeftkitError

__all__ = [
    "CheckpointError",
    "DataError",
    "NonFiniteGradientError",
    "NonFiniteLossError",
    "TrainingDivergedError",
    "TrainingError",
    "TrainingInterrupted",
]


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


class DataError(PeftkitError, ValueError):
    """A training or evaluation data file cannot be used: malformed line, missing columns, empty file, a label
    outside the label set, a chat row without an assistant turn. The message names the file and the line."""


class CheckpointError(PeftkitError, ValueError):
    """A checkpoint or run folder cannot be resumed or evaluated: no checkpoint, another base model, files
    missing or not matching the run."""


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a run after its current optimizer step; a full checkpoint was written first.

    A ``KeyboardInterrupt`` (not an ``Exception``), so generic ``except Exception`` handlers do not swallow a
    Ctrl-C. ``checkpoint`` is the folder written (``None`` when the trainer has no ``output_dir``) and
    ``signal_name`` the signal (``"SIGINT"`` / ``"SIGTERM"``).
    """

    def __init__(self, message: str, checkpoint: object = None, signal_name: str = "SIGINT") -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.signal_name = signal_name
