"""The OpenAI API's shapes: request bodies (each checking its options), the answers and stream chunks of
completions and chat completions, errors in OpenAI's ``{"error": {...}}`` shape with their HTTP statuses, and the
request-body size limit. :mod:`peftkit.serve.server` puts them behind FastAPI routes."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from peftkit.core.errors import AdapterExistsError, AdapterNotFoundError, InvalidConfigError, PeftkitError

from .errors import AdapterLoadError, EngineClosedError, EngineOverloadedError
from .request import Request as GenRequest
from .sampling import MAX_LOGPROBS, SamplingParams, TokenLogprob

__all__ = [
    "APIError",
    "AdapterBody",
    "BodyLimit",
    "ChatBody",
    "ChatShape",
    "CompletionBody",
    "CompletionShape",
    "EmbeddingBody",
    "Shape",
    "api_error",
    "chat_prompt",
    "error_response",
]

_log = logging.getLogger("peftkit.serve")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationBody(BaseModel):
    """What completions and chat completions share. Options this server does not implement are declared so that
    setting them is a 400 naming the option, not silently ignored."""

    model: str
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    # not implemented: refused when set to anything but their neutral value
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> dict[str, bool]:
        """Option name -> whether it is set although this server does not implement it."""
        return {
            "presence_penalty": self.presence_penalty not in (None, 0),
            "frequency_penalty": self.frequency_penalty not in (None, 0),
            "logit_bias": bool(self.logit_bias),
        }

    def sampling(
        self, max_tokens: int | None, limit: int, logprobs: int | None, prompt_logprobs: int | None
    ) -> SamplingParams:
        """The engine's settings for this request (``limit``: the server's ``max_tokens`` bound, also the
        default when ``max_tokens`` is ``None``); :class:`APIError` 400 naming a bad option."""
        if self.n != 1:
            raise _bad_param("n", "only n=1 is supported")
        if max_tokens is not None and max_tokens > limit:
            raise _bad_param("max_tokens", f"max_tokens={max_tokens} exceeds this server's limit of {limit}")
        if self.stream_options is not None and not self.stream:
            raise _bad_param("stream_options", "stream_options is only allowed with stream=true")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            return SamplingParams(
                # no max_tokens: until EOS, a stop string, the context's end or this server's limit
                max_tokens=limit if max_tokens is None else max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                seed=self.seed,
                stop=stop,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
            )
        except InvalidConfigError as exc:
            raise api_error(exc) from exc


class CompletionBody(_GenerationBody):
    """``/v1/completions`` request."""

    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for completions; null: until EOS or the context's end
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None  # not implemented
    best_of: int | None = None  # not implemented

    def unsupported(self) -> dict[str, bool]:
        return {"suffix": self.suffix is not None, "best_of": self.best_of not in (None, 1), **super().unsupported()}

    def params(self, limit: int) -> tuple[str, SamplingParams]:
        """The one prompt and the engine's settings (with ``echo``, the prompt is scored too)."""
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1:
            raise _bad_param("prompt", "send one prompt per request")
        _refuse_unsupported(self.unsupported())
        if self.max_tokens is not None and self.max_tokens < (0 if self.echo else 1):
            # OpenAI and vLLM: 0 only with echo (score the prompt, generate nothing)
            message = f"max_tokens must be at least 1 (0 only with echo=true), got {self.max_tokens}"
            raise _bad_param("max_tokens", message)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise _bad_param("logprobs", f"logprobs must lie in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        prompt_logprobs = self.logprobs if self.echo else None
        return prompts[0], self.sampling(self.max_tokens, limit, self.logprobs, prompt_logprobs)


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatBody(_GenerationBody):
    """``/v1/chat/completions`` request."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # not implemented
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> dict[str, bool]:
        return {
            **super().unsupported(),
            "tools": bool(self.tools),
            "tool_choice": self.tool_choice not in (None, "none"),
            "functions": bool(self.functions),
            "function_call": self.function_call not in (None, "none"),
            "response_format": (self.response_format or {}).get("type", "text") != "text",
        }

    def params(self, limit: int) -> tuple[int | None, SamplingParams]:
        """The number of alternatives per token's logprobs (``None``: no logprobs) and the engine's settings."""
        _refuse_unsupported(self.unsupported())
        param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if max_tokens is not None and max_tokens < 1:  # OpenAI: an integer below the minimum value is a 400
            raise _bad_param(param, f"{param} must be at least 1, got {max_tokens}")
        if self.top_logprobs is not None and not self.logprobs:
            raise _bad_param("top_logprobs", "top_logprobs requires logprobs=true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            message = f"top_logprobs must lie in [0, {MAX_LOGPROBS}], got {self.top_logprobs}"
            raise _bad_param("top_logprobs", message)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return logprobs, self.sampling(max_tokens, limit, logprobs, None)


class EmbeddingBody(BaseModel):
    """``/v1/embeddings`` (and ``/v1/classify``) request: one text, several, or token ids."""

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: str | None = "float"


class AdapterBody(BaseModel):
    """``POST /v1/adapters``: register ``name`` from ``path`` (relative to the adapters folder; default: the
    folder ``name``); ``replace`` swaps a registered adapter of that name for the new one."""

    name: str
    path: str | None = None
    replace: bool = False


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


def _bad_param(param: str, message: str) -> APIError:
    return APIError(400, message, "BadRequestError", "invalid_request", param)


def _refuse_unsupported(options: dict[str, bool]) -> None:
    """400 naming the first option that is set but not implemented here (``options``: name -> is it set)."""
    for name, used in options.items():
        if used:
            raise APIError(
                400, f"the option {name!r} is not supported by this server", "BadRequestError", "unsupported", name
            )


# peftkit's exceptions as HTTP statuses, OpenAI error types and codes (the first that fits; order matters: a
# subclass before its base class)
_STATUS: list[tuple[type[BaseException], int, str, str]] = [
    (AdapterNotFoundError, 404, "NotFoundError", "model_not_found"),
    (EngineOverloadedError, 429, "RateLimitError", "queue_full"),
    (EngineClosedError, 503, "ServiceUnavailableError", "shutting_down"),
    (AdapterLoadError, 422, "AdapterLoadError", "adapter_unloadable"),
    (AdapterExistsError, 409, "ConflictError", "adapter_exists"),
    (PeftkitError, 400, "BadRequestError", "invalid_request"),  # AdapterNameError, InvalidConfigError, ...
]


def api_error(exc: BaseException) -> APIError:
    """``exc`` as the error the client gets."""
    if isinstance(exc, APIError):
        return exc
    for kind, status, name, code in _STATUS:
        if isinstance(exc, kind):
            return APIError(status, str(exc), name, code)
    # the exception's text may name server internals (paths): the client gets its type, the log the rest
    _log.error("internal error", exc_info=exc)
    return APIError(500, f"internal error ({type(exc).__name__})", "InternalServerError")


def usage(req: GenRequest) -> dict[str, int]:
    p, c = len(req.prompt_ids), len(req.output_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class Shape:
    """How one endpoint's answers look: the whole answer, the stream's chunks, the final usage chunk."""

    object_type = ""
    chunk_type = ""

    def __init__(self, model: str, stream_options: StreamOptions | None, prefix: str) -> None:
        self.id, self.created, self.model = f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model
        # OpenAI: with include_usage every chunk has "usage": null and one last chunk, without choices, has it
        self.include_usage = stream_options is not None and stream_options.include_usage

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        out = {**self._head(self.chunk_type), "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, req: GenRequest) -> dict[str, Any]:
        return {**self._head(self.chunk_type), "choices": [], "usage": usage(req)}

    def final(self, req: GenRequest) -> dict[str, Any]:
        raise NotImplementedError

    def first(self, req: GenRequest) -> dict[str, Any]:
        raise NotImplementedError

    def chunk(self, req: GenRequest, text: str, reason: str | None, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        raise NotImplementedError


class CompletionShape(Shape):
    """``text_completion``: with ``echo`` the prompt comes first (and, with ``logprobs``, its tokens' logprobs,
    the first one ``null``); ``logprobs`` in the legacy shape (tokens, token_logprobs, top_logprobs with the
    chosen token among the alternatives, text_offset into the returned text)."""

    object_type = chunk_type = "text_completion"

    def __init__(self, model: str, stream_options: StreamOptions | None, echo: str | None, logprobs: int | None):
        super().__init__(model, stream_options, "cmpl")
        self.echo, self.logprobs = echo, logprobs

    def _logprobs(self, entries: list[TokenLogprob], shift: int) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        tops: list[dict[str, float] | None] = []
        for e in entries:
            if e.logprob is None:
                tops.append(None)
                continue
            top = {text: lp for _, text, lp in e.top}
            top.setdefault(e.token, e.logprob)
            tops.append(top)
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": tops,
            "text_offset": [e.offset + shift for e in entries],
        }

    def _choice(self, text: str, reason: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "finish_reason": reason, "logprobs": logprobs}

    def final(self, req: GenRequest) -> dict[str, Any]:
        echo = self.echo or ""
        logprobs = None
        if self.logprobs is not None:  # generated tokens' offsets count from the end of the echoed prompt
            parts = [self._logprobs(req.prompt_logprobs, 0)] if self.echo is not None else []
            parts.append(self._logprobs(req.logprobs, len(echo)))
            logprobs = {key: [x for part in parts for x in part[key]] for key in parts[-1]}  # type: ignore[index]
        choice = self._choice(echo + req.text, req.finish_reason, logprobs)
        return {**self._head(self.object_type), "choices": [choice], "usage": usage(req)}

    def first(self, req: GenRequest) -> dict[str, Any]:
        if self.echo is None:
            return self._chunk(self._choice("", None, None))
        return self._chunk(self._choice(self.echo, None, self._logprobs(req.prompt_logprobs, 0)))

    def chunk(self, req: GenRequest, text: str, reason: str | None, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        return self._chunk(self._choice(text, reason, self._logprobs(logprobs, len(self.echo or ""))))


class ChatShape(Shape):
    """``chat.completion``: ``logprobs`` as ``{"content": [{token, logprob, bytes, top_logprobs}]}``
    (``bytes`` is ``null`` for a token that holds only part of a UTF-8 character: its text alone is U+FFFD)."""

    object_type, chunk_type = "chat.completion", "chat.completion.chunk"

    def __init__(self, model: str, stream_options: StreamOptions | None, logprobs: bool) -> None:
        super().__init__(model, stream_options, "chatcmpl")
        self.logprobs = logprobs

    @staticmethod
    def _bytes(text: str) -> list[int] | None:
        return None if "\ufffd" in text else list(text.encode())

    def _logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        content = [
            {
                "token": e.token,
                "logprob": e.logprob,
                "bytes": self._bytes(e.token),
                "top_logprobs": [{"token": t, "logprob": lp, "bytes": self._bytes(t)} for _, t, lp in e.top],
            }
            for e in entries
        ]
        return {"content": content, "refusal": None}

    def final(self, req: GenRequest) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": req.text},
            "logprobs": self._logprobs(req.logprobs),
            "finish_reason": req.finish_reason,
        }
        return {**self._head(self.object_type), "choices": [choice], "usage": usage(req)}

    def first(self, req: GenRequest) -> dict[str, Any]:
        delta = {"role": "assistant", "content": ""}
        return self._chunk({"index": 0, "delta": delta, "logprobs": None, "finish_reason": None})

    def chunk(self, req: GenRequest, text: str, reason: str | None, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        lp = self._logprobs(logprobs) if logprobs else None
        return self._chunk({"index": 0, "delta": {"content": text}, "logprobs": lp, "finish_reason": reason})


class BodyLimit:
    """ASGI middleware: refuse a body above ``max_bytes`` (413) on its declared length, before it is read,
    and bodies without a declared length (411), so an oversized request never reaches the JSON parser.
    (A plain ASGI wrapper, not ``BaseHTTPMiddleware``, so streaming and disconnects pass through untouched.)"""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            declared = dict(scope["headers"]).get(b"content-length")
            error = None
            if declared is None:
                error = APIError(411, "Content-Length is required", "BadRequestError", "length_required")
            elif not declared.isdigit() or int(declared) > self.max_bytes:
                message = f"the request body has {declared.decode()} bytes; the limit is {self.max_bytes}"
                error = APIError(413, message, "BadRequestError", "request_too_large")
            if error is not None:
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def error_response(exc: APIError) -> JSONResponse:
    body = {"error": {"message": exc.message, "type": exc.kind, "code": exc.code, "param": exc.param}}
    return JSONResponse(body, status_code=exc.status)


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The tokenizer's chat template if it has one, else ``role: content`` lines and ``assistant:``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
