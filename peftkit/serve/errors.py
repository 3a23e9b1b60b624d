"""What serving raises (each a :class:`~peftkit.errors.PeftkitError`; the server maps them to HTTP statuses), and
the adapter-name check (the core's :func:`~peftkit.core.model.check_adapter_name`, which the registry applies)."""

from __future__ import annotations

from peftkit.core.errors import InvalidConfigError, PeftkitError
from peftkit.core.model import check_adapter_name

__all__ = [
    "AdapterLoadError",
    "AdapterRankError",
    "AdapterTooLargeError",
    "EngineClosedError",
    "EngineOverloadedError",
    "check_adapter_name",
]


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
