"""The errors of weight-space merging (:mod:`peftkit.merge`).

Each derives from :class:`peftkit.errors.PeftkitError` and from ``ValueError``, so generic handlers keep working.
Other bad input raises the core's errors: an unknown adapter name :class:`~peftkit.errors.AdapterNotFoundError`, a
``new_name`` already in use :class:`~peftkit.errors.AdapterExistsError`, an adapter without a weight-space update
:class:`~peftkit.errors.NotMergeableError`.
"""

from __future__ import annotations

from peftkit.core.errors import PeftkitError

__all__ = ["MergeError", "MergeOptionError", "MergeWeightsError", "TargetMismatchError"]


class MergeError(PeftkitError, ValueError):
    """Adapters that cannot be merged as asked."""


class MergeOptionError(MergeError):
    """An unknown merge method or option, or an option value out of range (``density`` outside ``(0, 1]``, ...)."""


class MergeWeightsError(MergeError):
    """Merge weights of the wrong length, or not finite."""


class TargetMismatchError(MergeError):
    """Adapters that adapt different modules (the message names the modules each one lacks)."""
