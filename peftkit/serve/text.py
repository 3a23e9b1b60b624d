"""Text in and out: prompts to token ids, token ids to the text streamed to clients.

Generated text is decoded from all the tokens so far and passed on incrementally. Held back until the next
token: the end of the text while a stop string may be starting there, and trailing U+FFFD characters, which
byte-level BPE tokenizers (GPT-2, Llama 3, Qwen) decode while a multi-byte UTF-8 character is split across
tokens and which become that character once its last byte arrives (as vLLM's and TGI's detokenizers do).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from peftkit.core.errors import InvalidConfigError

__all__ = ["TextCodec", "Tokenizer", "held_back", "stop_cut", "trailing_replacements"]


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer (Hugging Face tokenizers fit)."""

    eos_token_id: int | None

    def encode(self, text: str, *args: Any, **kwargs: Any) -> list[int]: ...

    def decode(self, ids: Sequence[int], *args: Any, **kwargs: Any) -> str: ...


class TextCodec:
    """A tokenizer as the engine uses it: prompts checked against the model's context ``max_len``; decoding
    with or without special tokens (tokenizers whose methods take no such keyword work too)."""

    def __init__(self, tokenizer: Tokenizer, max_len: int | None) -> None:
        self.tokenizer, self.max_len = tokenizer, max_len

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's end-of-sequence token (read each time: it may be set after the engine is built)."""
        return getattr(self.tokenizer, "eos_token_id", None)

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def prompt_ids(self, prompt: str | list[int], reserve: int = 0, special: bool = False) -> list[int]:
        """Token ids of a prompt (``special``: with the tokenizer's special tokens); ``InvalidConfigError`` if it
        is empty or leaves fewer than ``reserve`` positions of the model's context."""
        if isinstance(prompt, list):
            ids = list(prompt)
        else:
            ids = list(_call(self.tokenizer.encode, prompt, add_special_tokens=special))
        if not ids:
            raise InvalidConfigError("the prompt is empty")
        if self.max_len is not None and len(ids) + reserve > self.max_len:
            raise InvalidConfigError(f"the input has {len(ids)} tokens; the model's context is {self.max_len}")
        return ids

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids`` without special tokens."""
        return _call(self.tokenizer.decode, ids, skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """One token's text, special tokens included (a logprob names the token that was drawn)."""
        return _call(self.tokenizer.decode, [token], skip_special_tokens=False)

    def offsets(self, ids: list[int]) -> list[int]:
        """Where each token's text starts in the text of ``ids`` (a split character counts once complete)."""
        return [len(self.decode(ids[:j]).rstrip("\ufffd")) for j in range(len(ids))]


def _call(method: Callable[..., Any], arg: Any, **special: bool) -> Any:
    """``method(arg, **special)``, or ``method(arg)`` for tokenizers whose methods take no such keyword."""
    try:
        return method(arg, **special)
    except TypeError:
        return method(arg)


def trailing_replacements(text: str) -> int:
    """How many U+FFFD replacement characters end ``text`` (an incomplete UTF-8 sequence decodes to them)."""
    return len(text) - len(text.rstrip("\ufffd"))


def stop_cut(text: str, stop: list[str]) -> int:
    """Where the first stop string in ``text`` starts, or ``-1``."""
    return min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)


def held_back(text: str, stop: list[str]) -> int:
    """How many characters at the end of ``text`` an unfinished request keeps back (see the module docstring)."""
    return max(max((len(s) - 1 for s in stop), default=0), trailing_replacements(text))
