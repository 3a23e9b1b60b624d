"""``Request``: one generation request and, as it runs, its result (its KV cache lives in the engine's
:class:`~peftkit.serve.kv.BatchedKV`, not here)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .sampling import SamplingParams, TokenLogprob

__all__ = ["Request"]

_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation request and, as it runs, its result.

    Attributes:
        prompt: text or token ids.
        adapter: registered adapter name; ``None`` runs the base model.
        params: decoding settings.
        on_event: called from the engine thread with ``(request, new_text, finished)`` after each token.
        output_ids: generated token ids (without a final end-of-sequence token).
        text: generated text (cut at a stop string).
        finish_reason: ``"stop"``, ``"length"`` or ``"error"`` once finished.
        error: the exception that failed the request.
        logits: the next-token logits of each step (only with ``Engine(record_logits=True)``).
        logprobs: a :class:`TokenLogprob` per generated token (with ``params.logprobs``); after a stop string
            cut the text, only the tokens whose text starts before the cut.
        prompt_logprobs: a :class:`TokenLogprob` per prompt token (with ``params.prompt_logprobs``).
    """

    prompt: str | list[int]
    adapter: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    on_event: Callable[[Request, str, bool], None] | None = None
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    prompt_ids: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: BaseException | None = None
    logits: list[Tensor] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    _emitted: int = field(default=0, repr=False)
    _stable: int = field(default=0, repr=False)  # length of the decoded text without a trailing partial character
    _gen: torch.Generator | None = field(default=None, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _submitted: bool = field(default=False, repr=False)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    @property
    def emitted(self) -> int:
        """How many characters of :attr:`text` were passed to ``on_event`` so far."""
        return self._emitted

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def notify(self, delta: str, finished: bool) -> None:
        """Call ``on_event`` (if any) with new text; a broken listener must not stop the engine."""
        if self.on_event is None:
            return
        try:
            self.on_event(self, delta, finished)
        except Exception:
            pass
