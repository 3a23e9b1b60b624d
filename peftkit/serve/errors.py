"""What serving raises (each a :class:`~peftkit.errors.PeftkitError`; the server maps them to HTTP statuses), and
the one check of adapter names (:func:`check_adapter_name`)."""

from __future__ import annotations

import re

from peftkit.core.errors import AdapterNameError, InvalidConfigError, PeftkitError

__all__ = [
    "AdapterLoadError",
    "AdapterRankError",
    "AdapterTooLargeError",
    "EngineClosedError",
    "EngineOverloadedError",
    "check_adapter_name",
]

# Same alphabet as AdaptedModel adapter names: no '/', '.', '\\' or spaces, so a name is never a path.
_NAME = re.compile(r"[A-Za-z0-9_\-]{1,128}")


def check_adapter_name(name: object) -> str:
    """Return ``name`` if it is a valid adapter name (1-128 letters, digits, ``_`` or ``-``), else raise
    :class:`~peftkit.errors.AdapterNameError`. Names never contain path separators or dots, so they cannot
    escape the adapters folder. The registry (:class:`~peftkit.serve.cache.AdapterCache`) checks every name
    it takes in here; nothing else in serving checks names."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AdapterNameError(f"invalid adapter name {name!r}: use 1-128 letters, digits, '_' or '-'")
    return name


class AdapterLoadError(PeftkitError, ValueError):
    """One adapter could not be loaded (corrupt, truncated, or saved for another base model).

    Attributes:
        adapter: the adapter's registered name; other adapters are unaffected.
    """

    def __init__(self, adapter: str, message: str) -> None:
        super().__init__(f"adapter {adapter!r} cannot be loaded: {message}")
        self.adapter = adapter


class AdapterTooLargeError(AdapterLoadError):
    """An adapter whose tensors alone exceed the cache's byte budget."""


class AdapterRankError(InvalidConfigError):
    """An adapter's rank exceeds the engine's ``max_rank`` (the bank's padded rank; vLLM's
    ``max_lora_rank``)."""


class EngineOverloadedError(PeftkitError, RuntimeError):
    """The waiting queue is full (servers answer 429)."""


class EngineClosedError(PeftkitError, RuntimeError):
    """The engine is shutting down and takes no new requests (servers answer 503)."""
