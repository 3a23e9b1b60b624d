"""OpenAI-compatible HTTP server (FastAPI) over an :class:`~peftkit.serve.engine.Engine`.

The adapter is chosen by the request's ``model`` field (as in vLLM, LoRAX and TGI): the base model's name runs
the base, a registered adapter's name runs that adapter. Endpoints:

- ``GET /v1/models``: the base and every registered adapter that passes the load checks (adapters carry
  ``parent`` = base); the others are listed by ``GET /v1/adapters`` under ``unavailable``.
- ``POST /v1/completions``, ``POST /v1/chat/completions``: greedy or sampled generation, ``stream=true`` for
  server-sent events (``stream_options.include_usage``: a last chunk with the usage). A client that disconnects
  cancels its request (it leaves the running batch). As in OpenAI's API and vLLM: a chat without
  ``max_tokens`` runs to end-of-sequence, a stop string or the model's context (bounded by
  ``max_tokens_limit``); completions default to 16 tokens; ``max_tokens=0`` is a 400 except for completions
  with ``echo=true``, which return the prompt (and, with ``logprobs``, score it); ``logprobs`` (completions:
  the number of alternatives) and ``logprobs`` / ``top_logprobs`` (chat) give each token's log-probability
  under the model (raw logits, before temperature and top-p). Options not implemented here (``suffix``,
  ``best_of``, penalties, ``logit_bias``, tools, JSON ``response_format``) are a 400 naming the option.
- ``POST /v1/embeddings``: mean-pooled, unit-length embeddings from the encoder given as ``embedder`` (e.g.
  all-MiniLM-L6-v2; its name and its own adapters are the ``model`` values), or from the causal LM's last
  hidden state when there is none. ``POST /v1/classify`` (vLLM's shape): class probabilities of a sequence
  classifier served as ``embedder``.
- ``GET /v1/adapters`` (registered, unavailable with the reason, in the model, in memory),
  ``POST /v1/adapters {"name", "path", "replace"}`` (path inside the adapters folder; a name in use is 409
  unless ``replace`` is true, which swaps the adapter atomically: each request runs on one version),
  ``DELETE /v1/adapters/{name}``.
- ``GET /health``, ``GET /metrics`` (Prometheus text).

Errors use OpenAI's shape ``{"error": {"message", "type", "code"}}``: 401 bad API key, 404 unknown model,
400 bad request, 409 adapter name in use, 411/413 request body without a length or over ``max_body_bytes``,
422 adapter that cannot be loaded (corrupt, other base, rank above ``max_rank``), 429 queue full, 503 shutting
down. Messages name adapters and the paths clients gave (relative to the adapters folder), never the server's
absolute paths.

Shutdown is graceful: uvicorn stops accepting connections and waits for the open ones; then the engine
drains (finishes what is queued or running) before its loop stops.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel

from peftkit.core.errors import (
    AdapterExistsError,
    AdapterNameError,
    AdapterNotFoundError,
    InvalidConfigError,
    PeftkitError,
)

from .cache import AdapterLoadError, check_adapter_name
from .engine import MAX_LOGPROBS, Engine, EngineClosedError, EngineOverloadedError, SamplingParams, TokenLogprob
from .engine import Request as GenRequest

__all__ = ["create_app"]

_log = logging.getLogger("peftkit.serve")


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionBody(BaseModel):
    """``/v1/completions`` request. Options this server does not implement are declared so that setting them
    is a 400 naming the option, not silently ignored."""

    model: str
    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for completions; null: until EOS or the context's end
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    echo: bool = False
    logprobs: int | None = None
    user: str | None = None
    # not implemented: refused when set to anything but their neutral value
    suffix: str | None = None
    best_of: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatBody(BaseModel):
    """``/v1/chat/completions`` request (unimplemented options declared, as for completions)."""

    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | None = None
    top_logprobs: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None


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


def _api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AdapterNotFoundError):
        return APIError(404, str(exc), "NotFoundError", "model_not_found")
    if isinstance(exc, EngineOverloadedError):
        return APIError(429, str(exc), "RateLimitError", "queue_full")
    if isinstance(exc, EngineClosedError):
        return APIError(503, str(exc), "ServiceUnavailableError", "shutting_down")
    if isinstance(exc, AdapterLoadError):
        return APIError(422, str(exc), "AdapterLoadError", "adapter_unloadable")
    if isinstance(exc, AdapterExistsError):
        return APIError(409, str(exc), "ConflictError", "adapter_exists")
    if isinstance(exc, (AdapterNameError, InvalidConfigError, PeftkitError)):
        return APIError(400, str(exc), "BadRequestError", "invalid_request")
    # the exception's text may name server internals (paths): the client gets its type, the log the rest
    _log.error("internal error", exc_info=exc)
    return APIError(500, f"internal error ({type(exc).__name__})", "InternalServerError")


def create_app(
    engine: Engine,
    *,
    base_name: str = "base",
    api_key: str | None = None,
    adapters_root: str | Path | None = None,
    manage_engine: bool = True,
    embedder: Engine | None = None,
    embedder_name: str = "embedding",
    max_body_bytes: int = 1 << 20,
    max_tokens_limit: int = 4096,
    max_inputs: int = 256,
    drain_timeout: float = 60.0,
) -> FastAPI:
    """Build the FastAPI app.

    Args:
        engine: the engine that runs the requests.
        base_name: the ``model`` name of the base model (no adapter).
        api_key: if set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
        adapters_root: folder that ``POST /v1/adapters`` paths are resolved against (default: the cache's
            root).
        manage_engine: start the engine's background loop on startup and stop it (draining) on shutdown.
        embedder: an engine over an encoder model (or a classifier) for ``/v1/embeddings`` and
            ``/v1/classify``, with its own adapter cache; without one these endpoints use ``engine``'s model.
        embedder_name: the ``model`` name of the embedder's base.
        max_body_bytes: request bodies above this size get 413 (decision: 1 MiB by default).
        max_tokens_limit: ``max_tokens`` above this gets 400; a request without ``max_tokens`` stops after this
            many tokens at most (or at end-of-sequence, a stop string or the model's context, whichever is first).
        max_inputs: the most inputs one embeddings / classify request may carry.
        drain_timeout: how long shutdown waits for queued and running requests.
    """
    root = Path(adapters_root).resolve() if adapters_root is not None else engine.cache.root
    counters = {"http_requests": 0, "http_errors": 0, "http_429": 0}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                await asyncio.to_thread(engine.stop, drain=True, timeout=drain_timeout)

    app = FastAPI(title="peftkit", lifespan=lifespan)

    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def _handle(_: Request, exc: APIError) -> JSONResponse:
        counters["http_errors"] += 1
        counters["http_429"] += exc.status == 429
        return _error_response(exc)

    async def auth(authorization: str | None = Header(default=None)) -> None:
        counters["http_requests"] += 1
        if api_key is not None and authorization != f"Bearer {api_key}":
            raise APIError(401, "invalid or missing API key", "AuthenticationError", "invalid_api_key")

    def adapter_of(model: str) -> str | None:
        if model == base_name:
            return None
        if model not in engine.cache:
            raise APIError(404, f"the model {model!r} does not exist", "NotFoundError", "model_not_found")
        return model

    async def run(prompt: str, model: str, params: SamplingParams, stream: bool, shape: _Shape, http: Request) -> Any:
        loop = asyncio.get_running_loop()
        # (new text, finished, characters of text sent so far): the count is read in the engine thread with the
        # event, so the stream knows which tokens' logprobs go with the text it has sent
        events: asyncio.Queue[tuple[str, bool, int]] = asyncio.Queue()
        req = GenRequest(
            prompt,
            adapter=adapter_of(model),
            params=params,
            on_event=lambda r, delta, done: loop.call_soon_threadsafe(events.put_nowait, (delta, done, r.emitted)),
        )
        try:
            await asyncio.to_thread(engine.submit, req)
        except Exception as exc:
            raise _api_error(exc) from exc
        if not stream:
            try:
                checked = loop.time()
                while True:
                    try:
                        if (await asyncio.wait_for(events.get(), 0.5))[1]:
                            break
                    except TimeoutError:
                        pass
                    if loop.time() - checked >= 0.5:  # every half second, whether tokens flow or not
                        checked = loop.time()
                        if await http.is_disconnected():
                            engine.cancel(req)  # nobody waits for the answer: free the batch slot
                            return Response(status_code=499)
            except asyncio.CancelledError:
                engine.cancel(req)
                raise
            if req.error is not None:
                raise _api_error(req.error)
            return shape.final(req)

        async def sse() -> AsyncIterator[str]:
            try:
                yield f"data: {json.dumps(shape.first(req))}\n\n"
                sent = 0  # req.logprobs entries sent
                while True:
                    delta, done, emitted = await events.get()
                    if done and req.error is not None:
                        err = _api_error(req.error)
                        yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.kind}})}\n\n"
                        break
                    # the logprobs of the tokens whose text starts in what was sent (all of them at the end)
                    entries = req.logprobs
                    end = sent
                    while end < len(entries) and (done or entries[end].offset < emitted):
                        end += 1
                    if delta or done or end > sent:
                        chunk = shape.chunk(req, delta, req.finish_reason if done else None, entries[sent:end])
                        yield f"data: {json.dumps(chunk)}\n\n"
                        sent = end
                    if done:
                        break
                if shape.include_usage and req.error is None:
                    yield f"data: {json.dumps(shape.usage_chunk(req))}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the client went away (the response task is cancelled) or the stream ended
                engine.cancel(req)

        return StreamingResponse(sse(), media_type="text/event-stream")

    def sampling(
        body: CompletionBody | ChatBody, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None
    ) -> SamplingParams:
        if body.n != 1:
            raise _bad_param("n", "only n=1 is supported")
        if max_tokens is not None and max_tokens > max_tokens_limit:
            message = f"max_tokens={max_tokens} exceeds this server's limit of {max_tokens_limit}"
            raise _bad_param("max_tokens", message)
        if body.stream_options is not None and not body.stream:
            raise _bad_param("stream_options", "stream_options is only allowed with stream=true")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            return SamplingParams(
                # no max_tokens: until EOS, a stop string, the context's end or this server's limit
                max_tokens=max_tokens_limit if max_tokens is None else max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                seed=body.seed,
                stop=stop,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
            )
        except InvalidConfigError as exc:
            raise _api_error(exc) from exc

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> str:
        cache = engine.cache
        values: dict[str, tuple[str, float]] = {
            **{f"peftkit_{k}": ("counter", v) for k, v in engine.metrics.items()},
            **{f"peftkit_{k}_total": ("counter", v) for k, v in counters.items()},
            **{f"peftkit_cache_{k}_total": ("counter", v) for k, v in cache.stats.items()},
            "peftkit_requests_waiting": ("gauge", len(engine.waiting)),
            "peftkit_tokens_per_second": ("gauge", engine.tokens_per_second()),
            "peftkit_requests_running": ("gauge", len(engine.running)),
            "peftkit_adapters_in_model": ("gauge", len(engine.installed)),
            "peftkit_adapters_registered": ("gauge", len(cache.names())),
            "peftkit_cache_resident_bytes": ("gauge", cache.resident_bytes),
            "peftkit_cache_max_bytes": ("gauge", cache.max_bytes),
        }
        lines = []
        for name, (kind, value) in values.items():
            lines += [f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(lines) + "\n"

    def loadable(served: Engine) -> tuple[list[str], dict[str, str]]:
        """The registered adapters that look loadable, and why the others are not (see AdapterCache.problem)."""
        ok, bad = [], {}
        for n in served.cache.names():
            try:
                problem = served.cache.problem(n)
            except AdapterNotFoundError:  # unregistered meanwhile
                continue
            if problem is None:
                ok.append(n)
            else:
                bad[n] = problem
        return ok, bad

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models() -> dict[str, Any]:
        """The base models and the adapters that can serve (decision: adapters whose files fail the checks of
        ``AdapterCache.problem``, such as a corrupt tensor file or another base model, are left out, so a
        client only sees models it can use; ``GET /v1/adapters`` lists them under ``unavailable`` with the
        reason)."""
        now = int(time.time())
        data = []
        for name, served in [(base_name, engine), (embedder_name, embedder)]:
            if served is None:
                continue
            data.append({"id": name, "object": "model", "created": now, "owned_by": "peftkit", "parent": None})
            ok, _ = await asyncio.to_thread(loadable, served)
            data += [{"id": n, "object": "model", "created": now, "owned_by": "peftkit", "parent": name} for n in ok]
        return {"object": "list", "data": data}

    def encoder_of(model: str) -> tuple[Engine, str | None]:
        """The engine and adapter that ``model`` names for embeddings / classification."""
        if embedder is None:
            return engine, adapter_of(model)
        if model == embedder_name:
            return embedder, None
        if model not in embedder.cache:
            raise APIError(404, f"the embedding model {model!r} does not exist", "NotFoundError", "model_not_found")
        return embedder, model

    def inputs_of(body: EmbeddingBody) -> list[Any]:
        raw = body.input
        inputs: list[Any] = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
        if not inputs or len(inputs) > max_inputs:
            message = f"send 1 to {max_inputs} inputs, got {len(inputs)}"
            raise APIError(400, message, "BadRequestError", "invalid_request")
        return inputs

    @app.post("/v1/embeddings", dependencies=[Depends(auth)])
    async def embeddings(body: EmbeddingBody) -> dict[str, Any]:
        if body.encoding_format not in (None, "float", "base64"):
            message = "encoding_format must be 'float' or 'base64'"
            raise APIError(400, message, "BadRequestError", "invalid_request")
        served, adapter = encoder_of(body.model)
        inputs = inputs_of(body)
        try:
            vectors, n_tokens = await asyncio.to_thread(served.embed, inputs, adapter)
        except Exception as exc:
            raise _api_error(exc) from exc

        def encoded(v: Any) -> Any:
            # base64: the raw little-endian float32 bytes (what the openai client asks for by default)
            if body.encoding_format == "base64":
                return base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
            return v.tolist()

        data = [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)]
        usage_ = {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
        return {"object": "list", "data": data, "model": body.model, "usage": usage_}

    @app.post("/v1/classify", dependencies=[Depends(auth)])
    async def classify(body: EmbeddingBody) -> dict[str, Any]:
        served, adapter = encoder_of(body.model)
        inputs = inputs_of(body)
        try:
            probs, n_tokens = await asyncio.to_thread(served.classify, inputs, adapter)
        except Exception as exc:
            raise _api_error(exc) from exc
        labels = getattr(getattr(served.model.model, "config", None), "id2label", None) or {}
        data = [
            {"index": i, "label": labels.get(int(p.argmax()), str(int(p.argmax()))), "probs": p.tolist()}
            for i, p in enumerate(probs)
        ]
        return {"object": "list", "data": data, "model": body.model, "usage": {"prompt_tokens": n_tokens}}

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionBody, http: Request) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise _bad_param("prompt", "send one prompt per request")
        _refuse_unsupported(
            {
                "suffix": body.suffix is not None,
                "best_of": body.best_of not in (None, 1),
                "presence_penalty": body.presence_penalty not in (None, 0),
                "frequency_penalty": body.frequency_penalty not in (None, 0),
                "logit_bias": bool(body.logit_bias),
            }
        )
        if body.max_tokens is not None and body.max_tokens < (0 if body.echo else 1):
            # OpenAI and vLLM: 0 only with echo (score the prompt, generate nothing)
            message = f"max_tokens must be at least 1 (0 only with echo=true), got {body.max_tokens}"
            raise _bad_param("max_tokens", message)
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
            raise _bad_param("logprobs", f"logprobs must lie in [0, {MAX_LOGPROBS}], got {body.logprobs}")
        prompt_logprobs = body.logprobs if body.echo else None
        params = sampling(body, body.max_tokens, body.logprobs, prompt_logprobs)
        shape = _CompletionShape(body.model, body.stream_options, prompts[0] if body.echo else None, body.logprobs)
        return await run(prompts[0], body.model, params, body.stream, shape, http)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(body: ChatBody, http: Request) -> Any:
        _refuse_unsupported(
            {
                "presence_penalty": body.presence_penalty not in (None, 0),
                "frequency_penalty": body.frequency_penalty not in (None, 0),
                "logit_bias": bool(body.logit_bias),
                "tools": bool(body.tools),
                "tool_choice": body.tool_choice not in (None, "none"),
                "functions": bool(body.functions),
                "function_call": body.function_call not in (None, "none"),
                "response_format": (body.response_format or {}).get("type", "text") != "text",
            }
        )
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is not None and max_tokens < 1:  # OpenAI: an integer below the minimum value is a 400
            raise _bad_param(param, f"{param} must be at least 1, got {max_tokens}")
        if body.top_logprobs is not None and not body.logprobs:
            raise _bad_param("top_logprobs", "top_logprobs requires logprobs=true")
        if body.top_logprobs is not None and not 0 <= body.top_logprobs <= MAX_LOGPROBS:
            raise _bad_param("top_logprobs", f"top_logprobs must lie in [0, {MAX_LOGPROBS}], got {body.top_logprobs}")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prompt = chat_prompt(engine.tokenizer, [m.model_dump() for m in body.messages])
        params = sampling(body, max_tokens, logprobs, None)
        shape = _ChatShape(body.model, body.stream_options, logprobs is not None)
        return await run(prompt, body.model, params, body.stream, shape, http)

    @app.get("/v1/adapters", dependencies=[Depends(auth)])
    async def adapters() -> dict[str, Any]:
        _, unavailable = await asyncio.to_thread(loadable, engine)
        return {
            "registered": engine.cache.names(),
            "unavailable": unavailable,
            "in_model": engine.installed,
            "in_memory": engine.cache.resident(),
            "approximation_error": dict(engine.approximation_error),
        }

    @app.post("/v1/adapters", dependencies=[Depends(auth)])
    async def load(body: AdapterBody) -> dict[str, Any]:
        """Register an adapter once it is known to load (422 if not); a name in use is 409 unless
        ``replace`` is true, which swaps the adapter atomically (see ``Engine.load_adapter``)."""
        try:
            name = check_adapter_name(body.name)
            if name == base_name:
                raise AdapterNameError(f"{name!r} is the base model's name")
            if root is None:
                raise APIError(400, "the server has no adapters folder", "BadRequestError", "invalid_request")
            given = body.path or name
            path = (root / given).resolve()
            if not path.is_relative_to(root):  # messages quote the client's path, never the server's folders
                raise AdapterNameError(f"adapter folder {given!r} lies outside the adapters folder")
            if not body.replace and name in engine.cache:
                message = f'an adapter named {name!r} is already loaded; send "replace": true to swap it'
                raise APIError(409, message, "ConflictError", "adapter_exists")
            replaced = await asyncio.to_thread(engine.load_adapter, name, path, replace=body.replace)
        except Exception as exc:
            raise _api_error(exc) from exc
        return {"name": name, "status": "replaced" if replaced else "loaded"}

    @app.delete("/v1/adapters/{name}", dependencies=[Depends(auth)])
    async def unload(name: str) -> dict[str, Any]:
        try:
            await asyncio.to_thread(engine.unload_adapter, name)
        except Exception as exc:
            raise _api_error(exc) from exc
        return {"name": name, "status": "unloaded"}

    return app


def usage(req: GenRequest) -> dict[str, int]:
    p, c = len(req.prompt_ids), len(req.output_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class _Shape:
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


class _CompletionShape(_Shape):
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


class _ChatShape(_Shape):
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


class _BodyLimit:
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
                await _error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _error_response(exc: APIError) -> JSONResponse:
    body = {"error": {"message": exc.message, "type": exc.kind, "code": exc.code, "param": exc.param}}
    return JSONResponse(body, status_code=exc.status)


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The tokenizer's chat template if it has one, else ``role: content`` lines and ``assistant:``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
