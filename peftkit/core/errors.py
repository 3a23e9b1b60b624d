"""The exceptions users of peftkit can catch.

Every error peftkit raises on bad input derives from :class:`PeftkitError`, and each also derives from the
closest built-in exception (``ValueError``, ``KeyError``, ...) so generic handlers keep working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "AdapterExistsError",
    "AdapterFileError",
    "AdapterIdsError",
    "AdapterNameError",
    "AdapterNotFoundError",
    "AlreadyAdaptedError",
    "BaseModelMismatch",
    "ExportError",
    "FormatVersionError",
    "ForwardContextError",
    "InvalidConfigError",
    "NoAdaptersError",
    "NotMergeableError",
    "PeftkitError",
    "SavePathError",
    "TargetModuleError",
    "TargetModuleNotFound",
    "UnknownMethodError",
    "UnsupportedAdapterError",
    "UnsupportedLayerError",
]


class PeftkitError(Exception):
    """Base class of every peftkit error."""


class UnknownMethodError(PeftkitError, KeyError):
    """A method name that is not in the registry."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        known = sorted(known)
        hint = _close(name, known)
        super().__init__(f"unknown method {name!r}{hint}; registered methods: {', '.join(known)}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class InvalidConfigError(PeftkitError, ValueError):
    """A config field with an impossible value (r <= 0, a rank larger than the layer allows, ...)."""


class TargetModuleError(PeftkitError, ValueError):
    """A target that matches no module of the model, or a module of a kind the method cannot adapt."""


class TargetModuleNotFound(TargetModuleError):
    """No module of the model matches a requested target."""

    def __init__(self, target: str, candidates: Iterable[str], *, regex: bool = False) -> None:
        candidates = list(candidates)
        if regex:  # a regex is matched against full paths: show one, not leaf names close to the pattern text
            example = max(candidates, key=lambda c: c.count("."), default="")
            hint = f" (a regular expression must match a full module path such as {example!r})" if example else ""
        else:
            leaves = sorted({c.rsplit(".", 1)[-1] for c in candidates} | set(candidates))
            hint = _close(target, leaves)
        super().__init__(f"target {target!r} matches no module of the model{hint}")


class UnsupportedLayerError(TargetModuleError):
    """A targeted module whose type the method does not support."""


class AdapterNameError(PeftkitError, KeyError):
    """An adapter name that is already in use, not found, or not a valid name."""

    def __str__(self) -> str:
        return str(self.args[0])


class AdapterExistsError(AdapterNameError):
    """``add_adapter`` with a name that is already in use."""


class AdapterNotFoundError(AdapterNameError):
    """An adapter name that the model does not hold."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        known = sorted(known)
        super().__init__(f"no adapter named {name!r}{_close(name, known)}; the model holds: {known or 'none'}")


class NoAdaptersError(PeftkitError, LookupError):
    """An operation that needs adapters (saving, say) on a model that holds none."""


class AlreadyAdaptedError(PeftkitError, TypeError):
    """Wrapping a model that is already an ``AdaptedModel`` (add another adapter with ``add_adapter``)."""


class AdapterIdsError(PeftkitError, ValueError):
    """``adapter_ids`` of the wrong length, dtype or range for a mixed batch."""


class ForwardContextError(PeftkitError, RuntimeError):
    """An adapter needs a value an earlier adapter of the same forward should have handed it (its image
    features, say) and none is there for this batch: the producing module did not run first."""


class BaseModelMismatch(PeftkitError, ValueError):
    """An adapter saved for a different base model than the one it is loaded onto."""


class AdapterFileError(PeftkitError, ValueError):
    """A saved adapter that cannot be read: missing, truncated or corrupted files."""


class SavePathError(PeftkitError, OSError):
    """A save target that cannot take the files: a path that is a file, or a read-only folder or file."""


class FormatVersionError(AdapterFileError):
    """A saved adapter written in a newer or unknown format version."""


class UnsupportedAdapterError(AdapterFileError):
    """A foreign adapter folder (e.g. Hugging Face PEFT) that is readable but uses a method or an option
    peftkit cannot express exactly."""


class NotMergeableError(PeftkitError, TypeError):
    """Merging an adapter whose method has no weight-space equivalent."""


class ExportError(PeftkitError, ValueError):
    """An adapter that a foreign format (e.g. Hugging Face PEFT) cannot express."""


def _close(name: str, known: Iterable[str]) -> str:
    matches = difflib.get_close_matches(name, list(known), n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(repr(m) for m in matches)}?)" if matches else ""
