"""Choosing each next token, and its log-probabilities.

Sampling is per request: greedy (``temperature=0``) or temperature + top-p (nucleus sampling, Holtzman et al.
2020, "The Curious Case of Neural Text Degeneration") with the request's own seeded generator, so a seeded
request draws the same tokens alone or in any batch. Log-probabilities are the log-softmax of the raw logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from peftkit.core.errors import InvalidConfigError

__all__ = ["MAX_LOGPROBS", "SamplingParams", "TokenLogprob", "prompt_logprobs", "sample", "token_logprob"]

MAX_LOGPROBS = 20  # the most alternatives per token a request may ask for (OpenAI's top_logprobs bound)


@dataclass
class SamplingParams:
    """How a request decodes.

    Attributes:
        max_tokens: the most new tokens to generate; ``None``: until end-of-sequence, a stop string or the
            model's context is full (OpenAI's chat default); ``0``: none, the prompt is only scored (with
            ``prompt_logprobs``; OpenAI's ``echo`` with ``max_tokens=0``).
        temperature: ``0`` is greedy; otherwise logits are divided by it before sampling.
        top_p: nucleus sampling: sample among the most likely tokens whose probabilities add up to ``top_p``.
        seed: seed of the request's own generator (``None``: random).
        stop: strings that end the generation; the text is cut before the first one.
        ignore_eos: keep generating after the tokenizer's end-of-sequence token.
        logprobs: record each generated token's log-probability and the ``logprobs`` most likely alternatives
            (``0``: the token's own only; ``None``: nothing) in :attr:`Request.logprobs`.
        prompt_logprobs: the same for the prompt's tokens, in :attr:`Request.prompt_logprobs`.
    """

    max_tokens: int | None = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 0:
            raise InvalidConfigError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidConfigError(f"top_p must lie in (0, 1], got {self.top_p}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise InvalidConfigError(f"{name} must lie in [0, {MAX_LOGPROBS}], got {k}")

    def generator(self) -> torch.Generator:
        """A new generator for one request: seeded with :attr:`seed`, or with a random seed."""
        seed = self.seed if self.seed is not None else int(torch.randint(2**62, ()))
        return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model: the log-softmax of its raw next-token logits (before
    temperature and top-p; decision: vLLM's default, so the numbers do not depend on the sampling settings).

    Attributes:
        token_id: the token.
        token: its text, decoded alone (a token holding part of a UTF-8 character decodes to U+FFFD).
        logprob: ``log p(token | everything before it)``; ``None`` for a prompt's first token (nothing before).
        top: the most likely tokens at that position, ``(token_id, text, logprob)``, most likely first.
        offset: where the token's text starts in the text it belongs to (the generated text, or the prompt).
    """

    token_id: int
    token: str
    logprob: float | None
    top: list[tuple[int, str, float]]
    offset: int


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """Greedy (``temperature == 0``) or temperature + nucleus (top-p) sampling of one token id."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < params.top_p  # the first token is always kept
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def token_logprob(logits: Tensor, token: int, k: int, offset: int, text: Callable[[int], str]) -> TokenLogprob:
    """``token``'s log-probability under next-token ``logits`` and the ``k`` most likely tokens there (``text``:
    one token's text)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = _top(*(t.tolist() for t in logp.topk(k)), text) if k else []
    return TokenLogprob(token, text(token), float(logp[token]), top, offset)


def prompt_logprobs(
    ids: list[int], logits: Tensor, k: int, offsets: list[int], text: Callable[[int], str]
) -> list[TokenLogprob]:
    """A :class:`TokenLogprob` per prompt token from the prefill's logits ``[n - 1, vocab]`` (position j predicts
    token j+1; the first token has none); ``offsets``: where each token's text starts in the prompt."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(ids[1:]).view(-1, 1))[:, 0].tolist()
    tops = logp.topk(k, dim=-1) if k else None
    out = [TokenLogprob(ids[0], text(ids[0]), None, [], 0)]
    for j, token in enumerate(ids[1:]):
        top = [] if tops is None else _top(tops.values[j].tolist(), tops.indices[j].tolist(), text)
        out.append(TokenLogprob(token, text(token), chosen[j], top, offsets[j + 1]))
    return out


def _top(values: list[float], indices: list[int], text: Callable[[int], str]) -> list[tuple[int, str, float]]:
    return [(i, text(i), v) for v, i in zip(values, indices)]
