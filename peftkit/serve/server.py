"""OpenAI-compatible HTTP server (FastAPI) over an :class:`~peftkit.serve.engine.Engine`.

The adapter is chosen by the request's ``model`` field (as in vLLM, LoRAX and TGI): the base model's name runs
the base, a registered adapter's name runs that adapter. Endpoints:

- ``GET /v1/models``: the base and every registered adapter (adapters carry ``parent`` = base).
- ``POST /v1/completions``, ``POST /v1/chat/completions``: greedy or sampled generation, ``stream=true`` for
  server-sent events.
- ``GET /v1/adapters``, ``POST /v1/adapters {"name", "path"}`` (path inside the adapters folder),
  ``DELETE /v1/adapters/{name}``.
- ``GET /health``, ``GET /metrics`` (Prometheus text).

Errors use OpenAI's shape ``{"error": {"message", "type", "code"}}``: 401 bad API key, 404 unknown model,
400 bad request, 422 adapter that cannot be loaded (corrupt, other base), 429 queue full.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel

from peftkit.core.errors import AdapterNameError, AdapterNotFoundError, InvalidConfigError, PeftkitError

from .cache import AdapterLoadError, check_adapter_name
from .engine import Engine, EngineOverloadedError, SamplingParams
from .engine import Request as GenRequest

__all__ = ["create_app"]


class CompletionBody(BaseModel):
    """``/v1/completions`` request (the fields peftkit uses; others are ignored)."""

    model: str
    prompt: str | list[str]
    max_tokens: int | None = 16
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatBody(BaseModel):
    """``/v1/chat/completions`` request."""

    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1


class AdapterBody(BaseModel):
    """``POST /v1/adapters``: register ``name`` from ``path`` (relative to the adapters folder, or inside it)."""

    name: str
    path: str | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def _api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, AdapterNotFoundError):
        return APIError(404, str(exc), "NotFoundError", "model_not_found")
    if isinstance(exc, EngineOverloadedError):
        return APIError(429, str(exc), "RateLimitError", "queue_full")
    if isinstance(exc, AdapterLoadError):
        return APIError(422, str(exc), "AdapterLoadError", "adapter_unloadable")
    if isinstance(exc, (AdapterNameError, InvalidConfigError, PeftkitError)):
        return APIError(400, str(exc), "BadRequestError", "invalid_request")
    return APIError(500, f"internal error: {exc}", "InternalServerError")


def create_app(
    engine: Engine,
    *,
    base_name: str = "base",
    api_key: str | None = None,
    adapters_root: str | Path | None = None,
    manage_engine: bool = True,
) -> FastAPI:
    """Build the FastAPI app.

    Args:
        engine: the engine that runs the requests.
        base_name: the ``model`` name of the base model (no adapter).
        api_key: if set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
        adapters_root: folder that ``POST /v1/adapters`` paths are resolved against (default: the cache's
            root).
        manage_engine: start the engine's background loop on startup and stop it on shutdown.
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
                engine.stop()

    app = FastAPI(title="peftkit", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _handle(_: Request, exc: APIError) -> JSONResponse:
        counters["http_errors"] += 1
        counters["http_429"] += exc.status == 429
        body = {"error": {"message": exc.message, "type": exc.kind, "code": exc.code, "param": None}}
        return JSONResponse(body, status_code=exc.status)

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

    async def run(prompt: str, model: str, params: SamplingParams, stream: bool, shape: Any) -> Any:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, bool]] = asyncio.Queue()
        req = GenRequest(
            prompt,
            adapter=adapter_of(model),
            params=params,
            on_event=lambda r, delta, done: loop.call_soon_threadsafe(events.put_nowait, (delta, done)),
        )
        try:
            await asyncio.to_thread(engine.submit, req)
        except Exception as exc:
            raise _api_error(exc) from exc
        if not stream:
            while not (await events.get())[1]:
                pass
            if req.error is not None:
                raise _api_error(req.error)
            return shape(req, req.text, req.finish_reason, final=True)

        async def sse() -> AsyncIterator[str]:
            yield f"data: {json.dumps(shape(req, '', None, final=False, first=True))}\n\n"
            while True:
                delta, done = await events.get()
                if done and req.error is not None:
                    err = _api_error(req.error)
                    yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.kind}})}\n\n"
                    break
                if delta or done:
                    chunk = shape(req, delta, req.finish_reason if done else None, final=False)
                    yield f"data: {json.dumps(chunk)}\n\n"
                if done:
                    break
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    def sampling(body: CompletionBody | ChatBody, max_tokens: int | None) -> SamplingParams:
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", "BadRequestError", "invalid_request")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            return SamplingParams(
                max_tokens=max_tokens or 16,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                seed=body.seed,
                stop=stop,
            )
        except InvalidConfigError as exc:
            raise _api_error(exc) from exc

    def usage(req: GenRequest) -> dict[str, int]:
        p, c = len(req.prompt_ids), len(req.output_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

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

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models() -> dict[str, Any]:
        now = int(time.time())
        data = [{"id": base_name, "object": "model", "created": now, "owned_by": "peftkit", "parent": None}]
        data += [
            {"id": n, "object": "model", "created": now, "owned_by": "peftkit", "parent": base_name}
            for n in engine.cache.names()
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionBody) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, "send one prompt per request", "BadRequestError", "invalid_request")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def shape(req: GenRequest, text: str, reason: str | None, final: bool, first: bool = False) -> dict:
            out = {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}],
            }
            if final:
                out["usage"] = usage(req)
            return out

        return await run(prompts[0], body.model, sampling(body, body.max_tokens), body.stream, shape)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(body: ChatBody) -> Any:
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        prompt = chat_prompt(engine.tokenizer, [m.model_dump() for m in body.messages])

        def shape(req: GenRequest, text: str, reason: str | None, final: bool, first: bool = False) -> dict:
            if final:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                return {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": body.model,
                    "choices": [choice],
                    "usage": usage(req),
                }
            delta = {"role": "assistant", "content": ""} if first else {"content": text}
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": body.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
            }

        params = sampling(body, body.max_completion_tokens or body.max_tokens)
        return await run(prompt, body.model, params, body.stream, shape)

    @app.get("/v1/adapters", dependencies=[Depends(auth)])
    async def adapters() -> dict[str, Any]:
        return {"registered": engine.cache.names(), "in_model": engine.installed, "in_memory": engine.cache.resident()}

    @app.post("/v1/adapters", dependencies=[Depends(auth)])
    async def load(body: AdapterBody) -> dict[str, Any]:
        try:
            name = check_adapter_name(body.name)
            if name == base_name:
                raise AdapterNameError(f"{name!r} is the base model's name")
            if root is None:
                raise APIError(400, "the server has no adapters folder", "BadRequestError", "invalid_request")
            path = (root / (body.path or name)).resolve()
            engine.cache.register(name, path)  # refuses paths outside the root
            try:
                await asyncio.wrap_future(engine.cache.get_async(name))  # validate now: 422 if unloadable
            except Exception:
                engine.cache.unregister(name)
                raise
        except Exception as exc:
            raise _api_error(exc) from exc
        return {"name": name, "status": "loaded"}

    @app.delete("/v1/adapters/{name}", dependencies=[Depends(auth)])
    async def unload(name: str) -> dict[str, Any]:
        try:
            await asyncio.to_thread(engine.unload_adapter, name)
        except Exception as exc:
            raise _api_error(exc) from exc
        return {"name": name, "status": "unloaded"}

    return app


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The tokenizer's chat template if it has one, else ``role: content`` lines and ``assistant:``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
