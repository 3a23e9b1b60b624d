"""``Engine``: one frozen causal LM serving many adapters in mixed, continuously batched decode steps.

How a step runs (CPU reference design, chosen for being obviously correct):

1. **Admission.** Waiting requests (FIFO) join the running batch between decode steps (continuous batching)
   once their adapter is injected in the model. A missing adapter is fetched from the :class:`AdapterCache`
   in a loader thread; requests for other adapters go ahead meanwhile. At most ``max_loras`` adapters live in
   the model; the least recently used one that no running request needs is deleted to make room.
2. **Prefill** runs per new request, alone (``[1, L]``, no padding), with its adapter id, and keeps that
   request's own KV cache (one ``(key, value)`` pair per layer, ``[1, heads, L, head_dim]``).
3. **Decode** runs all running requests together: their caches are left-padded with zeros to the longest one
   and stacked, the attention mask is 0 on the padding and ``position_ids`` are each request's true position,
   so every row computes exactly what it would compute alone (masked keys get weight exactly 0). The
   ``adapter_ids`` of the rows route each row through its own adapter (``AdaptedLayer``'s stacked low-rank
   bank, or the per-group fallback for adapters without a low-rank form); ``-1`` rows are the base model.
   Afterwards each row's cache is cut back to its own length. Re-padding costs one copy of the caches per
   step, which is negligible next to the model on CPU; a paged KV pool (S-LoRA's unified paging) is the
   faster design for accelerators.

Sampling is per request: greedy (``temperature=0``) or temperature + top-p with the request's own seeded
generator, so a seeded request draws the same tokens alone or in any batch.
"""

from __future__ import annotations

import inspect
import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from peftkit.core.errors import AdapterNotFoundError, InvalidConfigError, PeftkitError
from peftkit.core.io import check_fingerprint
from peftkit.core.model import AdaptedModel
from peftkit.core.registry import get_method

from .cache import AdapterCache, AdapterLoadError, CachedAdapter

__all__ = ["Engine", "EngineOverloadedError", "Request", "SamplingParams", "Tokenizer"]

KV = list[tuple[Tensor, Tensor]]


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer (Hugging Face tokenizers fit)."""

    eos_token_id: int | None

    def encode(self, text: str, *args: Any, **kwargs: Any) -> list[int]: ...

    def decode(self, ids: Sequence[int], *args: Any, **kwargs: Any) -> str: ...


class EngineOverloadedError(PeftkitError, RuntimeError):
    """The waiting queue is full (servers answer 429)."""


@dataclass
class SamplingParams:
    """How a request decodes.

    Attributes:
        max_tokens: the most new tokens to generate.
        temperature: ``0`` is greedy; otherwise logits are divided by it before sampling.
        top_p: nucleus sampling: sample among the most likely tokens whose probabilities add up to ``top_p``.
        seed: seed of the request's own generator (``None``: random).
        stop: strings that end the generation; the text is cut before the first one.
        ignore_eos: keep generating after the tokenizer's end-of-sequence token.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise InvalidConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidConfigError(f"top_p must lie in (0, 1], got {self.top_p}")


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
    created: float = field(default_factory=time.time)
    _kv: KV | None = field(default=None, repr=False)
    _emitted: int = field(default=0, repr=False)
    _gen: torch.Generator | None = field(default=None, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)


class Engine:
    """Batched multi-adapter generation on one frozen causal LM.

    Args:
        model: a Hugging Face causal LM (or an ``AdaptedModel`` around one); wrapped once and frozen.
        tokenizer: see :class:`Tokenizer`.
        cache: where adapters come from (the engine installs its fingerprint check as ``cache.validate`` if
            the cache has none).
        max_loras: adapters held in the model at once (the batch may mix all of them).
        max_batch: requests decoded together.
        max_queue: waiting requests; :meth:`submit` raises :class:`EngineOverloadedError` beyond it.
        max_prefills_per_step: new requests admitted between two decode steps.
        record_logits: keep every step's logits on the request (tests).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        cache: AdapterCache,
        *,
        max_loras: int = 8,
        max_batch: int = 16,
        max_queue: int = 256,
        max_prefills_per_step: int = 4,
        record_logits: bool = False,
    ) -> None:
        self.model = model if isinstance(model, AdaptedModel) else AdaptedModel(model)
        self.model.eval()
        self.tokenizer = tokenizer
        self.cache = cache
        if cache.validate is None:
            cache.validate = self.check_compatible
        self.max_loras, self.max_batch, self.max_queue = max_loras, max_batch, max_queue
        self.max_prefills_per_step = max_prefills_per_step
        self.record_logits = record_logits
        config = getattr(self.model.model, "config", None)
        self.max_len: int | None = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        params = inspect.signature(self.model.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._fetching: dict[str, Future[CachedAdapter]] = {}
        self._installed: OrderedDict[str, None] = OrderedDict()  # adapters in the model, LRU first
        self._unload_later: set[str] = set()
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.metrics = {
            "requests_total": 0,
            "requests_finished": 0,
            "requests_failed": 0,
            "tokens_generated": 0,
            "prompt_tokens": 0,
            "decode_steps": 0,
            "adapter_loads": 0,
            "adapter_unloads": 0,
        }

    # --------------------------------------------------------------------------------------------- adapters
    def check_compatible(self, meta: dict[str, Any]) -> None:
        """Raise a :class:`~peftkit.errors.PeftkitError` if a saved adapter (its ``adapter.json``) does not fit
        this base model: unknown method, invalid config, or a different base (fingerprint)."""
        check_fingerprint(self.model.model, meta["base_fingerprint"])
        method = get_method(meta["method"])
        try:
            method.config_class.from_dict(meta["config"])
        except TypeError as exc:
            raise InvalidConfigError(f"the saved config does not fit method {meta['method']!r}: {exc}") from None

    def _install(self, entry: CachedAdapter) -> bool:
        """Put a loaded adapter into the model; ``False`` if every slot is held by running requests."""
        name = entry.name
        if name in self._installed:
            return True
        in_use = {r.adapter for r in self.running}
        while len(self._installed) >= self.max_loras:
            victim = next((n for n in self._installed if n not in in_use), None)
            if victim is None:
                return False
            self._remove(victim)
        meta = entry.meta
        config = get_method(meta["method"]).config_class.from_dict(meta["config"])
        self.model.add_adapter(name, config, activate=False)
        try:
            modules = self.model.adapter_modules(name)
            if sorted(modules) != sorted(meta["base_fingerprint"]):
                raise AdapterLoadError(name, "its targets select other modules on this base than it was saved for")
            expected = {
                f"{path}.{key}": t
                for path, adapter in modules.items()
                for key, t in adapter.state_dict(keep_vars=True).items()
            }
            if set(expected) != set(entry.tensors):
                raise AdapterLoadError(name, "its tensors do not match its config")
            with torch.no_grad():
                for key, t in expected.items():
                    if entry.tensors[key].shape != t.shape:
                        raise AdapterLoadError(name, f"tensor {key!r} has shape {tuple(entry.tensors[key].shape)}")
                    t.copy_(entry.tensors[key])
        except BaseException:
            self.model.delete_adapter(name)
            raise
        self._installed[name] = None
        self.metrics["adapter_loads"] += 1
        return True

    def _remove(self, name: str) -> None:
        self.model.delete_adapter(name)
        del self._installed[name]
        self.metrics["adapter_unloads"] += 1

    def unload_adapter(self, name: str) -> None:
        """Unregister ``name`` and take it out of the model (after the running requests that use it end)."""
        with self._lock:
            self.cache.unregister(name)
            if any(r.adapter == name for r in self.running):
                self._unload_later.add(name)
            elif name in self._installed:
                self._remove(name)

    @property
    def installed(self) -> list[str]:
        """Adapters now in the model, least recently used first."""
        return list(self._installed)

    # --------------------------------------------------------------------------------------------- requests
    def submit(self, request: Request) -> Request:
        """Queue a request (thread-safe). Raises :class:`AdapterNotFoundError` for an unregistered adapter,
        :class:`EngineOverloadedError` when the queue is full, ``InvalidConfigError`` for a prompt that
        does not fit the model."""
        if request.adapter is not None and request.adapter not in self.cache:
            raise AdapterNotFoundError(request.adapter, self.cache.names())
        ids = request.prompt if isinstance(request.prompt, list) else self._encode(request.prompt)
        if not ids:
            raise InvalidConfigError("the prompt is empty")
        if self.max_len is not None and len(ids) >= self.max_len:
            raise InvalidConfigError(f"the prompt has {len(ids)} tokens; the model's context is {self.max_len}")
        request.prompt_ids = list(ids)
        seed = request.params.seed
        request._gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise EngineOverloadedError(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue})")
            self.waiting.append(request)
            self.metrics["requests_total"] += 1
        self._wake.set()
        return request

    def generate(self, requests: Sequence[Request], timeout: float = 600.0) -> list[Request]:
        """Submit ``requests`` and return them finished. Without a background loop (:meth:`start`) the steps
        run in the calling thread."""
        for r in requests:
            self.submit(r)
        deadline = time.monotonic() + timeout
        while not all(r.finished for r in requests):
            if time.monotonic() > deadline:
                raise TimeoutError("generation did not finish in time")
            if self._thread is None:
                if not self.step():
                    self._wake.wait(0.01)
                    self._wake.clear()
            else:
                next(r for r in requests if not r.finished).wait(0.05)
        return list(requests)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------------------------------------ steps
    @torch.no_grad()
    def step(self) -> bool:
        """Admit waiting requests, then run one decode step over the running batch. Returns whether any
        work was done."""
        with self._lock:
            admitted = self._admit()
            if not self.running:
                return admitted
            self._decode()
            self._retire()
            return True

    def _admit(self) -> bool:
        admitted = 0
        for req in list(self.waiting):
            if len(self.running) >= self.max_batch or admitted >= self.max_prefills_per_step:
                break
            if req.adapter is not None and req.adapter not in self._installed and not self._ready(req):
                continue
            self.waiting.remove(req)
            try:
                self._prefill(req)
            except Exception as exc:  # a failing request must not take the batch down
                self._fail(req, exc)
                continue
            self.running.append(req)
            admitted += 1
        return admitted > 0

    def _ready(self, req: Request) -> bool:
        """Start or finish the fetch of ``req``'s adapter; install it when it arrives."""
        name = req.adapter
        assert name is not None
        future = self._fetching.get(name)
        if future is None:
            try:
                future = self.cache.get_async(name)
            except PeftkitError as exc:  # unregistered meanwhile
                self._fail_adapter(name, exc)
                return False
            self._fetching[name] = future
            future.add_done_callback(lambda _: self._wake.set())
        if not future.done():
            return False
        try:
            entry = future.result()
            if not self._install(entry):
                return False  # every slot is busy: wait for running requests to finish
        except Exception as exc:
            self._fetching.pop(name, None)
            self._fail_adapter(name, exc)
            return False
        self._fetching.pop(name, None)
        return True

    def _adapter_id(self, name: str | None) -> int:
        if name is None:
            return -1
        self._installed.move_to_end(name)
        return self.model.adapter_names.index(name)

    def _prefill(self, req: Request) -> None:
        ids = torch.tensor([req.prompt_ids])
        out = self.model(
            input_ids=ids, adapter_ids=torch.tensor([self._adapter_id(req.adapter)]), use_cache=True, return_dict=True
        )
        req._kv = _kv_of(_cache_of(out))
        self.metrics["prompt_tokens"] += len(req.prompt_ids)
        self._emit(req, out.logits[0, -1])

    def _decode(self) -> None:
        batch = [r for r in self.running if not r.finished]
        if not batch:
            return
        lens = [r._kv[0][0].shape[2] for r in batch]  # type: ignore[index]
        longest = max(lens)
        layers = []
        for layer in range(len(batch[0]._kv)):  # type: ignore[arg-type]
            keys = [_left_pad(r._kv[layer][0], longest) for r in batch]  # type: ignore[index]
            values = [_left_pad(r._kv[layer][1], longest) for r in batch]  # type: ignore[index]
            layers.append((torch.cat(keys), torch.cat(values)))
        mask = torch.zeros(len(batch), longest + 1, dtype=torch.long)
        for i, n in enumerate(lens):
            mask[i, longest - n :] = 1
        from transformers import DynamicCache

        out = self.model(
            input_ids=torch.tensor([[r.output_ids[-1]] for r in batch]),
            attention_mask=mask,
            position_ids=torch.tensor([[n] for n in lens]),
            adapter_ids=torch.tensor([self._adapter_id(r.adapter) for r in batch]),
            use_cache=True,
            return_dict=True,
            **{self._cache_kw: DynamicCache(ddp_cache_data=layers)},
        )
        new = _kv_of(_cache_of(out))
        self.metrics["decode_steps"] += 1
        for i, (req, n) in enumerate(zip(batch, lens)):
            req._kv = [(k[i : i + 1, :, longest - n :], v[i : i + 1, :, longest - n :]) for k, v in new]
            self._emit(req, out.logits[i, -1])

    def _emit(self, req: Request, logits: Tensor) -> None:
        """Sample the next token from ``logits`` and update the request's text, finishing it if due."""
        if self.record_logits:
            req.logits.append(logits.detach().clone())
        token = sample(logits, req.params, req._gen)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        p = req.params
        reason = None
        if token == eos and not p.ignore_eos:
            reason = "stop"
        else:
            req.output_ids.append(token)
            self.metrics["tokens_generated"] += 1
        full = self._decode_text(req.output_ids)
        cut = min((i for i in (full.find(s) for s in p.stop if s) if i >= 0), default=-1)
        if cut >= 0:
            full, reason = full[:cut], "stop"
        elif reason is None and (
            len(req.output_ids) >= p.max_tokens
            or (self.max_len is not None and len(req.prompt_ids) + len(req.output_ids) >= self.max_len)
        ):
            reason = "length"
        req.text = full
        hold = 0 if reason else max((len(s) - 1 for s in p.stop), default=0)  # a stop string may be starting
        upto = max(req._emitted, len(full) - hold)
        delta, req._emitted = full[req._emitted : upto], upto
        if reason:
            self._finish(req, reason, delta)
        elif req.on_event is not None and delta:
            req.on_event(req, delta, False)

    def _finish(self, req: Request, reason: str, delta: str = "") -> None:
        req.finish_reason = reason
        req._kv = None
        self.metrics["requests_failed" if reason == "error" else "requests_finished"] += 1
        req._done.set()
        if req.on_event is not None:
            try:
                req.on_event(req, delta, True)
            except Exception:  # a broken listener must not stop the engine
                pass

    def _fail(self, req: Request, exc: BaseException) -> None:
        req.error = exc
        self._finish(req, "error")

    def _fail_adapter(self, name: str, exc: BaseException) -> None:
        for req in [r for r in self.waiting if r.adapter == name]:
            self.waiting.remove(req)
            self._fail(req, exc)

    def _retire(self) -> None:
        self.running = [r for r in self.running if not r.finished]
        in_use = {r.adapter for r in self.running}
        for name in [n for n in self._unload_later if n not in in_use]:
            self._unload_later.discard(name)
            if name in self._installed:
                self._remove(name)

    def _encode(self, text: str) -> list[int]:
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return list(self.tokenizer.encode(text))

    def _decode_text(self, ids: list[int]) -> str:
        try:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        except TypeError:
            return self.tokenizer.decode(ids)

    # ----------------------------------------------------------------------------------------- background
    def start(self) -> None:
        """Run steps in a background thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="peftkit-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                worked = self.step()
            except Exception as exc:  # keep serving: fail what was running, go on
                with self._lock:
                    for req in self.running:
                        self._fail(req, exc)
                    self.running = []
                continue
            if not worked:
                self._wake.wait(0.05)
                self._wake.clear()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


# ------------------------------------------------------------------------------------------------ helpers
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


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "past_key_values", None)
    return cache if cache is not None else getattr(out, "cache", None)


def _kv_of(cache: Any) -> KV:
    """Per-layer ``(key, value)`` tensors of a transformers ``DynamicCache``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _left_pad(t: Tensor, length: int) -> Tensor:
    missing = length - t.shape[2]
    if missing == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], missing, t.shape[3]), t], dim=2)
