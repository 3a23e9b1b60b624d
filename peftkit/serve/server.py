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
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from peftkit.core.errors import AdapterNameError, AdapterNotFoundError

from .engine import Engine
from .folders import inside
from .openai_api import (
    AdapterBody,
    APIError,
    BodyLimit,
    ChatBody,
    ChatShape,
    CompletionBody,
    CompletionShape,
    EmbeddingBody,
    Shape,
    api_error,
    chat_prompt,
    error_response,
)
from .request import Request as GenRequest
from .sampling import SamplingParams

__all__ = ["chat_prompt", "create_app"]

T = TypeVar("T")


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

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def _handle(_: Request, exc: APIError) -> JSONResponse:
        counters["http_errors"] += 1
        counters["http_429"] += exc.status == 429
        return error_response(exc)

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

    async def run(prompt: str, model: str, params: SamplingParams, stream: bool, shape: Shape, http: Request) -> Any:
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
        await in_thread(engine.submit, req)
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
                raise api_error(req.error)
            return shape.final(req)

        async def sse() -> AsyncIterator[str]:
            try:
                yield f"data: {json.dumps(shape.first(req))}\n\n"
                sent = 0  # req.logprobs entries sent
                while True:
                    delta, done, emitted = await events.get()
                    if done and req.error is not None:
                        err = api_error(req.error)
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

    async def encoded(body: EmbeddingBody, task: str) -> tuple[Engine, Any, int]:
        """The engine that ``body.model`` names and its ``task`` (``"embed"`` or ``"classify"``) of the inputs: the
        vectors or probabilities, and the number of input tokens."""
        served, adapter = encoder_of(body.model)
        raw = body.input
        inputs: list[Any] = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
        if not inputs or len(inputs) > max_inputs:
            message = f"send 1 to {max_inputs} inputs, got {len(inputs)}"
            raise APIError(400, message, "BadRequestError", "invalid_request")
        out, n_tokens = await in_thread(getattr(served, task), inputs, adapter)
        return served, out, n_tokens

    @app.post("/v1/embeddings", dependencies=[Depends(auth)])
    async def embeddings(body: EmbeddingBody) -> dict[str, Any]:
        if body.encoding_format not in (None, "float", "base64"):
            message = "encoding_format must be 'float' or 'base64'"
            raise APIError(400, message, "BadRequestError", "invalid_request")
        _, vectors, n_tokens = await encoded(body, "embed")

        def encoded_vector(v: Any) -> Any:
            # base64: the raw little-endian float32 bytes (what the openai client asks for by default)
            if body.encoding_format == "base64":
                return base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
            return v.tolist()

        data = [{"object": "embedding", "index": i, "embedding": encoded_vector(v)} for i, v in enumerate(vectors)]
        usage_ = {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
        return {"object": "list", "data": data, "model": body.model, "usage": usage_}

    @app.post("/v1/classify", dependencies=[Depends(auth)])
    async def classify(body: EmbeddingBody) -> dict[str, Any]:
        served, probs, n_tokens = await encoded(body, "classify")
        labels = getattr(getattr(served.model.model, "config", None), "id2label", None) or {}
        data = [
            {"index": i, "label": labels.get(int(p.argmax()), str(int(p.argmax()))), "probs": p.tolist()}
            for i, p in enumerate(probs)
        ]
        return {"object": "list", "data": data, "model": body.model, "usage": {"prompt_tokens": n_tokens}}

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionBody, http: Request) -> Any:
        prompt, params = body.params(max_tokens_limit)
        shape = CompletionShape(body.model, body.stream_options, prompt if body.echo else None, body.logprobs)
        return await run(prompt, body.model, params, body.stream, shape, http)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(body: ChatBody, http: Request) -> Any:
        logprobs, params = body.params(max_tokens_limit)
        prompt = chat_prompt(engine.tokenizer, [m.model_dump() for m in body.messages])
        shape = ChatShape(body.model, body.stream_options, logprobs is not None)
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
            name = body.name  # (checked by the cache when it reads the adapter, before anything else)
            if name == base_name:
                raise AdapterNameError(f"{name!r} is the base model's name")
            if root is None:
                raise APIError(400, "the server has no adapters folder", "BadRequestError", "invalid_request")
            path = inside(root, body.path or name)  # messages quote the client's path, never the server's folders
            if not body.replace and name in engine.cache:
                message = f'an adapter named {name!r} is already loaded; send "replace": true to swap it'
                raise APIError(409, message, "ConflictError", "adapter_exists")
            replaced = await asyncio.to_thread(engine.load_adapter, name, path, replace=body.replace)
        except Exception as exc:
            raise api_error(exc) from exc
        return {"name": name, "status": "replaced" if replaced else "loaded"}

    @app.delete("/v1/adapters/{name}", dependencies=[Depends(auth)])
    async def unload(name: str) -> dict[str, Any]:
        await in_thread(engine.unload_adapter, name)
        return {"name": name, "status": "unloaded"}

    return app


async def in_thread(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``function(*args, **kwargs)`` in a worker thread (the engine's calls may wait for a step); what it raises
    reaches the client as an :class:`APIError`."""
    try:
        return await asyncio.to_thread(function, *args, **kwargs)
    except Exception as exc:
        raise api_error(exc) from exc
