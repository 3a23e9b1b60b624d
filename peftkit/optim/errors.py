"""Errors of :mod:`peftkit.optim` (each a :class:`~peftkit.errors.PeftkitError` and a ``ValueError``)."""

from __future__ import annotations

from peftkit.core.errors import PeftkitError


class OptimizerError(PeftkitError, ValueError):
    """An optimizer asked for something it cannot do (an unknown name, bad settings)."""


class NoTrainableParametersError(OptimizerError):
    """An optimizer built for a model with no trainable parameters."""


class GaLoreShapeError(OptimizerError):
    """GaLore asked to project a parameter that is not a matrix."""


class NoLowRankPairsError(OptimizerError):
    """An optimizer for low-rank adapters (LoRA-Pro, ALLoRA, LoRA+) found no ``(A, B)`` factor pair to act on."""
