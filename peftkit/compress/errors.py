"""The errors of low-rank compression (:mod:`peftkit.compress`).

Each derives from :class:`peftkit.errors.PeftkitError` (through :class:`CompressError`) and from the closest
built-in exception, so generic handlers keep working.
"""

from __future__ import annotations

from collections.abc import Iterable

from peftkit.core.errors import PeftkitError

__all__ = [
    "CalibrationError",
    "CompressError",
    "CompressOptionError",
    "CompressorError",
    "HeadPruneError",
    "RankError",
    "RatioError",
    "UnknownArchitectureError",
    "check_fraction",
    "check_rank",
]


class CompressError(PeftkitError):
    """Base class of the compression errors."""


class CompressOptionError(CompressError, ValueError):
    """An unknown mode or option value, or shapes that do not fit together."""


class CompressorError(CompressError, ValueError):
    """An unknown weight compressor, or one whose optional package is missing."""


class RatioError(CompressError, ValueError):
    """A compression / sparsity ratio outside the open interval ``(0, 1)``."""


class RankError(CompressError, ValueError):
    """A rank that is not positive or larger than the layer allows (``min(out, in)``)."""


class CalibrationError(CompressError, ValueError):
    """Calibration data that is empty, or tokenised for another tokenizer (ids outside the model's vocabulary)."""


class HeadPruneError(CompressError, ValueError):
    """Pruning as many attention heads (or MLP channels) as a layer has, or more."""


class UnknownArchitectureError(CompressError, TypeError):
    """A model whose layout the method does not know; the message names the modules it looked for."""

    def __init__(self, method: str, looked_for: Iterable[str], found: str = "") -> None:
        wanted = ", ".join(looked_for)
        super().__init__(f"{method} does not know this architecture: it looked for {wanted}{found}")


def check_fraction(name: str, value: object) -> float:
    """``value`` as a float in the open interval ``(0, 1)``, else :class:`RatioError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise RatioError(f"{name} must lie in the open interval (0, 1), got {value!r}")
    return float(value)


def check_rank(rank: object, shape: tuple[int, ...], where: str = "the layer") -> int:
    """``rank`` as an int in ``[1, min(shape)]``, else :class:`RankError` naming ``where`` and its shape."""
    limit = min(shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise RankError(f"rank {rank!r} does not fit {where} of shape {tuple(shape)}: it must lie in [1, {limit}]")
    return rank
