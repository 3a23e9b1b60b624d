"""``Engine``: one frozen causal LM serving many adapters in mixed, continuously batched decode steps.

How a step runs (CPU reference design, chosen for being obviously correct):

1. **Admission.** Waiting requests (FIFO) join the running batch between decode steps (continuous batching)
   once their adapter is injected in the model. A missing adapter is fetched from the :class:`AdapterCache`
   in a loader thread, started when the request is submitted (and, for the first ``max_loras`` adapters
   waiting, again at each step), so it is usually in memory by the next step; requests for other adapters
   go ahead meanwhile. At most ``max_loras`` adapters live in the model; the least recently used one that no
   running request needs is deleted to make room. The waiting queue has its own short lock: submitting or
   cancelling never waits for a step to finish.
2. **Prefill** runs the requests admitted in this step together: their prompts are right-padded to the
   longest, with an attention mask that is 0 on the padding (a real token only attends to real tokens before
   it, so its keys, values and logits are what it computes alone), one adapter id per row. Each request then
   keeps its own KV cache (one ``(key, value)`` pair per layer, ``[1, heads, L, head_dim]``, cut to its
   prompt length).
3. **Decode** runs all running requests together on one batched cache: their caches are left-padded with
   zeros to the longest one and stacked, the attention mask is 0 on the padding and ``position_ids`` are each
   request's true position, so every row computes exactly what it would compute alone (masked keys get weight
   exactly 0). The stacked cache is rebuilt only when a request joins or leaves; between such changes each
   step passes on the cache the previous step returned. The
   ``adapter_ids`` of the rows route each row through its own adapter (``AdaptedLayer``'s stacked low-rank
   bank, or the per-group fallback for adapters without a low-rank form); ``-1`` rows are the base model.
   Re-stacking costs one copy of the caches per change of the batch; a paged KV pool (S-LoRA's unified
   paging) is the faster design for accelerators.

Sampling is per request: greedy (``temperature=0``) or temperature + top-p with the request's own seeded
generator, so a seeded request draws the same tokens alone or in any batch.

Adapters without a low-rank form (DoRA, ...) run through the per-group fallback of ``AdaptedLayer`` (one
forward of the adapter per group of rows), or, with ``svd_rank``, are converted at install time to a rank-k
approximation of their ``delta_weight`` (truncated SVD, as the serving spec allows for mergeable methods); the
relative Frobenius error of each conversion is reported in :attr:`Engine.approximation_error`.

The same engine also embeds and classifies (:meth:`Engine.embed`, :meth:`Engine.classify`), with the model
it holds: an encoder (``BertModel``, e.g. the packaged all-MiniLM-L6-v2, or a sequence classifier) or a
causal LM whose last hidden state is mean-pooled (decision: mean pooling over the real tokens, then L2
normalisation, as sentence-transformers' MiniLM does and OpenAI's unit-length embeddings are).
"""

from __future__ import annotations

import inspect
import itertools
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from peftkit.core.base import BaseView
from peftkit.core.errors import (
    AdapterExistsError,
    AdapterFileError,
    AdapterNotFoundError,
    InvalidConfigError,
    PeftkitError,
)
from peftkit.core.model import AdaptedModel
from peftkit.core.protocol import Adapter, AdapterConfig, LowRank, add_lowrank, skip_init
from peftkit.core.registry import get_method
from peftkit.core.state import check_fingerprint

from .cache import AdapterCache, AdapterLoadError, CachedAdapter, check_adapter_name

__all__ = [
    "AdapterRankError",
    "Engine",
    "EngineClosedError",
    "EngineOverloadedError",
    "Request",
    "SVDLowRank",
    "SamplingParams",
    "TokenLogprob",
    "Tokenizer",
]

KV = list[tuple[Tensor, Tensor]]


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer (Hugging Face tokenizers fit)."""

    eos_token_id: int | None

    def encode(self, text: str, *args: Any, **kwargs: Any) -> list[int]: ...

    def decode(self, ids: Sequence[int], *args: Any, **kwargs: Any) -> str: ...


class EngineOverloadedError(PeftkitError, RuntimeError):
    """The waiting queue is full (servers answer 429)."""


class EngineClosedError(PeftkitError, RuntimeError):
    """The engine is shutting down and takes no new requests (servers answer 503)."""


class AdapterRankError(InvalidConfigError):
    """An adapter's rank exceeds the engine's ``max_rank`` (the bank's padded rank; vLLM's
    ``max_lora_rank``)."""


class SVDLowRank(Adapter):
    """A rank-k stand-in for an adapter without a low-rank form: ``Δy = (x downᵀ) upᵀ`` with
    ``up · down`` = the truncated SVD of the original adapter's ``delta_weight`` (built by the engine at
    install time; never saved)."""

    method = "svd-lowrank"

    def __init__(self, base: BaseView, config: AdapterConfig, down: Tensor, up: Tensor) -> None:
        super().__init__(base, config)
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        return add_lowrank(base_out, x @ self.down.T, self.up)

    def delta_weight(self, base: BaseView) -> Tensor:
        return self.up @ self.down

    def lowrank(self, base: BaseView) -> LowRank:
        return LowRank(self.down, self.up, 1.0)


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
    _kv: KV | None = field(default=None, repr=False)  # own cache, until it joins the batched one
    _len: int = field(default=0, repr=False)  # tokens in its cache
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


class Engine:
    """Batched multi-adapter generation on one frozen causal LM.

    Args:
        model: a Hugging Face causal LM (or an ``AdaptedModel`` around one); wrapped once and frozen. Its
            adapters are declared static (``AdaptedModel.set_static_adapters``): change them through the
            engine (load / unload), not by writing into their tensors.
        tokenizer: see :class:`Tokenizer`.
        cache: where adapters come from (the engine installs its fingerprint check as ``cache.validate`` if
            the cache has none).
        max_loras: adapters held in the model at once (the batch may mix all of them).
        max_batch: requests decoded together.
        max_queue: waiting requests; :meth:`submit` raises :class:`EngineOverloadedError` beyond it.
        max_prefills_per_step: new requests admitted (and prefilled together) between two decode steps.
        max_rank: the largest adapter rank accepted (checked on the saved config's ``r`` when the adapter is
            loaded and on every module's low-rank form when it is installed); larger ones fail with
            :class:`AdapterRankError` (servers: 422) and leave the engine and other adapters untouched.
            Decision: 64 by default (vLLM's ``max_lora_rank`` defaults to 16; peftkit's banks pad to the
            largest rank present, so the bound is about memory, not correctness).
        svd_rank: convert adapters without a low-rank form but with a ``delta_weight`` (and no bias change) to
            rank-``svd_rank`` truncated SVDs when installed, so they join the stacked bank; ``None`` (default)
            keeps them exact on the per-group fallback path.
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
        max_rank: int = 64,
        svd_rank: int | None = None,
        record_logits: bool = False,
    ) -> None:
        self.model = model if isinstance(model, AdaptedModel) else AdaptedModel(model)
        self.model.eval()
        self.model.set_adapter([])  # rows choose their adapter; none applies to all
        # adapter tensors are written only by _install: mixed batches need not re-check their versions
        self.model.set_static_adapters()
        self.tokenizer = tokenizer
        self.cache = cache
        if cache.validate is None:
            cache.validate = self.check_compatible
        self.max_loras, self.max_batch, self.max_queue = max_loras, max_batch, max_queue
        self.max_prefills_per_step = max_prefills_per_step
        if svd_rank is not None and not 0 < svd_rank <= max_rank:
            raise InvalidConfigError(f"svd_rank must lie in [1, max_rank={max_rank}], got {svd_rank}")
        self.max_rank, self.svd_rank = max_rank, svd_rank
        self.approximation_error: dict[str, float] = {}  # adapter -> worst relative error of its SVD conversion
        self.record_logits = record_logits
        config = getattr(self.model.model, "config", None)
        self.max_len: int | None = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None
        )
        params = inspect.signature(self.model.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keeps_logits = "logits_to_keep" in params  # project only each prompt's last position on the vocab
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._fetching: dict[str, Future[CachedAdapter]] = {}
        self._installed: OrderedDict[str, None] = OrderedDict()  # adapters in the model, LRU first
        self._unload_later: set[str] = set()
        # The running batch's KV cache, left-padded, in the order of _batch (see _rebuild_batch_cache).
        self._batch: list[Request] = []
        self._admitting: list[Request] = []
        self._batch_cache: Any = None
        self._batch_mask = torch.zeros(0, 0, dtype=torch.long)
        self._lock = threading.RLock()  # held for a whole step: the model, the running batch, the adapters
        self._queue_lock = threading.Lock()  # held briefly: the waiting queue
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._closed = False
        self._token_times: deque[float] = deque(maxlen=1 << 16)  # for tokens_per_second
        self.metrics = {
            "requests_total": 0,
            "requests_finished": 0,
            "requests_failed": 0,
            "requests_cancelled": 0,
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
            config = method.config_class.from_dict(meta["config"])
        except TypeError as exc:
            raise InvalidConfigError(f"the saved config does not fit method {meta['method']!r}: {exc}") from None
        rank = getattr(config, "r", None)
        if isinstance(rank, int) and rank > self.max_rank:
            raise AdapterRankError(f"its rank r={rank} exceeds the engine's max_rank={self.max_rank}")

    def _install(self, entry: CachedAdapter) -> bool:
        """Put a loaded adapter into the model; ``False`` if every slot is held by running requests."""
        name = entry.name
        if name in self._installed:
            return True
        config = _config_of(entry)
        # requests being admitted in this step are not running yet, but their adapters must stay too
        in_use = {r.adapter for r in (*self.running, *self._admitting)}
        reused = None
        while len(self._installed) >= self.max_loras:
            victim = next((n for n in self._installed if n not in in_use), None)
            if victim is None:
                return False
            if reused is None and self._reusable(victim, config):
                reused = victim  # same config: its modules take the new tensors (no delete + build)
                del self._installed[victim]
                self.metrics["adapter_unloads"] += 1
            else:
                self._remove(victim)
        if reused is not None:
            self.model.rename_adapter(reused, name)
        self._build(name, entry, config, fresh=reused is None)
        self._installed[name] = None
        self.metrics["adapter_loads"] += 1
        return True

    def _build(self, slot: str, entry: CachedAdapter, config: AdapterConfig, fresh: bool = True) -> None:
        """Fill adapter ``slot`` of the model (added here if ``fresh``, else already holding modules of the same
        config) with ``entry``'s saved tensors; on any error ``slot`` is deleted and the error, an
        :class:`AdapterLoadError` naming ``entry``, propagates."""
        if fresh:
            with skip_init():  # every saved tensor is copied in below
                self.model.add_adapter(slot, config, activate=False)
        try:
            if sorted(self.model.layer_paths[slot]) != sorted(entry.meta["base_fingerprint"]):
                raise AdapterLoadError(
                    entry.name, "its targets select other modules on this base than it was saved for"
                )
            try:  # the one path from saved tensors to adapter modules (pk.load's): fit_state, checks, copy
                self.model.assign_tensors(slot, entry.tensors, source=entry.source)
            except AdapterFileError as exc:
                raise AdapterLoadError(entry.name, str(exc)) from None
            self._to_lowrank(slot, config, entry.name)
        except BaseException:
            self.model.delete_adapter(slot)
            self.approximation_error.pop(slot, None)
            raise

    def _try_install(self, entry: CachedAdapter) -> None:
        """Install ``entry`` under a scratch name and take it out again: raises what installing it for a request
        would raise (tensors that do not fit its config, a rank above ``max_rank``), changing nothing."""
        probe = f"probe-{secrets.token_hex(8)}"
        self._build(probe, entry, _config_of(entry))
        self.model.delete_adapter(probe)
        self.approximation_error.pop(probe, None)

    def _reusable(self, victim: str, config: AdapterConfig) -> bool:
        """Whether the modules of installed adapter ``victim`` can take another saved adapter's tensors: same
        config, not an SVD stand-in, and shapes that the config alone fixes (no module reshapes to its saved
        state in ``fit_state``: a reused module could hold another adapter's structure, e.g. grown components)."""
        if self.model.configs[victim] != config or victim in self.approximation_error:
            return False
        return all(type(a).fit_state is Adapter.fit_state for a in self.model.adapter_modules(victim).values())

    @torch.no_grad()
    def _to_lowrank(self, name: str, config: AdapterConfig, shown: str | None = None) -> None:
        """Check every module's rank against ``max_rank``; with ``svd_rank``, replace modules that have no
        low-rank form by the truncated SVD of their ``delta_weight`` and record the worst relative error
        ``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F`` (= the discarded singular values' share of the norm). Errors name the
        adapter ``shown`` (default: ``name``)."""
        worst = None
        for path, adapter in self.model.adapter_modules(name).items():
            layer = self.model._layer(path)
            form = adapter.lowrank(layer.base)
            if form is not None:
                if form.down.shape[0] > self.max_rank:
                    raise AdapterLoadError(
                        shown or name, f"module {path!r} has rank {form.down.shape[0]} > max_rank={self.max_rank}"
                    )
                continue
            if self.svd_rank is None or layer.base.kind != "linear" or adapter.delta_bias(layer.base) is not None:
                continue  # exact per-group fallback
            delta = adapter.delta_weight(layer.base)
            if delta is None:
                continue
            u, sv, vh = torch.linalg.svd(delta.float(), full_matrices=False)
            k = min(self.svd_rank, sv.numel())
            total = float(sv.square().sum())
            error = float(sv[k:].square().sum() / total) ** 0.5 if total > 0 else 0.0
            worst = error if worst is None else max(worst, error)
            root = sv[:k].sqrt()
            dtype = layer.base.dtype if layer.base.dtype.is_floating_point else torch.float32
            down = (root[:, None] * vh[:k]).to(dtype)
            up = (u[:, :k] * root).to(dtype)
            layer.add(name, SVDLowRank(layer.base, config, down, up))  # replaces the module
        if worst is not None:
            self.approximation_error[name] = worst

    def _remove(self, name: str) -> None:
        self.approximation_error.pop(name, None)
        self.model.delete_adapter(name)
        del self._installed[name]
        self.metrics["adapter_unloads"] += 1

    def load_adapter(self, name: str, path: str | Path, *, replace: bool = False) -> bool:
        """Register adapter ``name`` from folder ``path`` (relative paths: relative to the cache's root) once it
        is known to work: its files are read and checked against the base, and it is installed on trial and
        taken out again, so an adapter that would fail its requests is refused here and nothing changes.

        With ``replace=True`` an adapter already registered as ``name`` is swapped for the new one atomically:
        every request runs on one version from admission to end. Requests running on the old version finish on
        it; requests for ``name`` that are admitted later (including those waiting now) run on the new one, and
        wait while the old one is still in use. If the new one fails to load, the old one keeps serving.

        Returns whether an adapter was replaced.

        Raises:
            AdapterExistsError: ``name`` is registered and ``replace`` is false.
            AdapterLoadError: unreadable, corrupt, saved for another base, or its tensors do not fit its config.
            AdapterNameError: an invalid name, or a folder outside the cache's root.
        """
        check_adapter_name(name)
        if not replace and name in self.cache:
            raise AdapterExistsError(f"an adapter named {name!r} is already loaded; ask to replace it")
        entry = self.cache.read(name, path)  # outside the step lock: reading may take a while
        with self._lock:
            self._try_install(entry)
            replaced = name in self.cache
            self.cache.put(name, entry, replace=replace)
            self._fetching.pop(name, None)  # a fetch of the previous version must not be installed
            if name in self._installed:
                self._retire_version(name)
        self._wake.set()
        return replaced

    def unload_adapter(self, name: str) -> None:
        """Unregister ``name`` and take it out of the model (after the running requests that use it end)."""
        with self._lock:
            self.cache.unregister(name)
            if name in self._installed:
                self._retire_version(name)

    def _retire_version(self, name: str) -> None:
        """Take the version of ``name`` now in the model out: at once if no running request uses it, else when
        the last one ends (:meth:`_retire`); until then no new request for ``name`` is admitted, so none mixes
        the old version with a newer one."""
        if any(r.adapter == name for r in self.running):
            self._unload_later.add(name)
        else:
            self._remove(name)

    @property
    def installed(self) -> list[str]:
        """Adapters now in the model, least recently used first."""
        return list(self._installed)

    # --------------------------------------------------------------------------------------------- requests
    def submit(self, request: Request) -> Request:
        """Queue a request (thread-safe). Raises :class:`AdapterNotFoundError` for an unregistered adapter,
        :class:`EngineOverloadedError` when the queue is full, :class:`EngineClosedError` while shutting
        down, ``InvalidConfigError`` for a prompt that does not fit the model."""
        if self._closed:
            raise EngineClosedError("the engine is shutting down")
        if request._submitted:  # twice in the batch, its rows would both write its output
            raise InvalidConfigError(f"request {request.id!r} was submitted already; make a new Request")
        if request.adapter is not None and request.adapter not in self.cache:
            raise AdapterNotFoundError(request.adapter, self.cache.names())
        if request.params.max_tokens is None and self.max_len is None:
            raise InvalidConfigError("max_tokens is required: the model's context length is unknown")
        ids = self._prompt_ids(request.prompt, reserve=0 if request.params.max_tokens == 0 else 1)
        request.prompt_ids = ids
        seed = request.params.seed
        request._gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))
        with self._queue_lock:  # not the step lock: a request joins the queue while a step runs
            if len(self.waiting) >= self.max_queue:
                raise EngineOverloadedError(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue})")
            self.waiting.append(request)
            request._submitted = True
            self.metrics["requests_total"] += 1
            queued = len(self.waiting)
        adapter = request.adapter
        if adapter is not None and queued <= self.max_loras and adapter not in self._installed:
            # Load it now, while the running step goes on: otherwise the load would start only when a step
            # sees the request, and it would join one step later than a request for a resident adapter.
            try:
                self.cache.prefetch(adapter)
            except PeftkitError:  # unregistered meanwhile: admission reports it
                pass
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

    # ------------------------------------------------------------------------------- embeddings, classification
    @torch.no_grad()
    def encode(self, inputs: Sequence[str | list[int]], adapter: str | None = None, timeout: float = 60.0) -> Any:
        """One forward of ``inputs`` (right-padded, attention mask) through the model with ``adapter`` on
        every row (``None``: the base), with ``output_hidden_states``. Returns ``(output, mask)``.

        Runs in the calling thread, between two generation steps (it takes the engine lock), and installs
        the adapter like a generation request would; it waits up to ``timeout`` for a free adapter slot
        (:class:`EngineOverloadedError` after that)."""
        if self._closed:
            raise EngineClosedError("the engine is shutting down")
        if adapter is not None and adapter not in self.cache:
            raise AdapterNotFoundError(adapter, self.cache.names())
        if not inputs:
            raise InvalidConfigError("the input is empty")
        # Texts get the tokenizer's special tokens here ([CLS] ... [SEP] for BERT encoders, which are trained with
        # them; sentence-transformers embeds that way); generation prompts do not (chat templates add theirs).
        rows = [self._prompt_ids(x, special=True) for x in inputs]
        entry = self.cache.get(adapter, timeout) if adapter is not None else None
        lens = [len(r) for r in rows]
        ids = torch.full((len(rows), max(lens)), _pad_id(self.tokenizer), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : lens[i]] = torch.tensor(row)
            mask[i, : lens[i]] = 1
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if entry is None or self._install(entry):
                    aid = self._adapter_id(adapter)
                    out = self.model(
                        input_ids=ids,
                        attention_mask=mask,
                        adapter_ids=self._row_ids([aid] * len(rows)),
                        output_hidden_states=True,
                        return_dict=True,
                    )
                    self.metrics["prompt_tokens"] += sum(lens)
                    return out, mask
            if time.monotonic() > deadline:
                raise EngineOverloadedError(f"no adapter slot became free for {adapter!r} in {timeout} s")
            time.sleep(0.01)

    def embed(self, inputs: Sequence[str | list[int]], adapter: str | None = None) -> tuple[Tensor, int]:
        """Unit-length embeddings ``[len(inputs), hidden]``: the mean of the last hidden state over each
        input's tokens, L2-normalised; and the number of input tokens."""
        out, mask = self.encode(inputs, adapter)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out.hidden_states[-1]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1)
        return torch.nn.functional.normalize(pooled.float(), dim=-1), int(mask.sum())

    def classify(self, inputs: Sequence[str | list[int]], adapter: str | None = None) -> tuple[Tensor, int]:
        """Class probabilities ``[len(inputs), classes]`` of a sequence-classification model (softmax of its
        ``logits``), and the number of input tokens."""
        out, mask = self.encode(inputs, adapter)
        logits = getattr(out, "logits", None)
        if logits is None or logits.dim() != 2:
            raise InvalidConfigError("the served model is not a sequence classifier (no [batch, classes] logits)")
        return torch.softmax(logits.float(), dim=-1), int(mask.sum())

    def has_work(self) -> bool:
        with self._lock:  # a step moves requests from waiting to running under the step lock
            return bool(self.waiting or self.running)

    def cancel(self, request: Request) -> bool:
        """Take ``request`` out of the queue or the running batch (a client went away); its KV cache is freed
        and the batch goes on without it. Returns whether it was still unfinished."""
        if request.finished:  # the common case (stream ended normally): no need to wait for the step lock
            return False
        with self._queue_lock:
            dequeued = self._dequeue(request)
        if dequeued:  # (finished outside the queue lock: its listener may submit again)
            self._finish(request, "cancelled")
            return True
        with self._lock:
            if request.finished:
                return False
            self._finish(request, "cancelled")
            self._retire()
            return True

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last ``window`` seconds."""
        since = time.monotonic() - window
        return sum(1 for t in list(self._token_times) if t >= since) / window

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

    def _dequeue(self, req: Request) -> bool:
        """Take ``req`` out of the waiting queue (call with ``_queue_lock`` held); ``False`` if it is not there
        (cancelled meanwhile)."""
        try:
            self.waiting.remove(req)
        except ValueError:
            return False
        return True

    def _admit(self) -> bool:
        new: list[Request] = []
        self._admitting = new
        with self._queue_lock:
            queue = list(self.waiting)
        for req in queue:
            if len(self.running) + len(new) >= self.max_batch or len(new) >= self.max_prefills_per_step:
                break
            if req.adapter in self._unload_later:
                continue  # the model still holds the previous version of its adapter, in use by running requests
            if req.adapter is not None and req.adapter not in self._installed and not self._ready(req):
                continue
            with self._queue_lock:
                if self._dequeue(req):
                    new.append(req)
        self._admitting = []
        self._prefetch(queue)
        if not new:
            return False
        # Requests that score their prompt need the logits of every position: prefilled alone, so the others
        # keep projecting only their last position on the vocabulary.
        groups = [[r for r in new if r.params.prompt_logprobs is None]]
        groups += [[r] for r in new if r.params.prompt_logprobs is not None]
        for group in groups:
            if not group:
                continue
            try:
                self._prefill(group)
            except Exception:  # a failing request must not take the batch down: retry one by one
                for req in group:
                    try:
                        self._prefill([req])
                    except Exception as exc:
                        self._fail(req, exc)
        self.running += [r for r in new if not r.finished]
        return True

    def _fetch(self, name: str) -> Future[CachedAdapter]:
        """The (shared) load of adapter ``name`` into the cache, started if needed; its end wakes the loop."""
        future = self._fetching.get(name)
        if future is None:
            future = self.cache.get_async(name)
            self._fetching[name] = future
            future.add_done_callback(lambda _: self._wake.set())
        return future

    def _prefetch(self, queue: list[Request]) -> None:
        """Start loading the adapters of the first ``max_loras`` distinct adapters waiting in ``queue``, so
        that they are in memory when their requests reach the front (loads run in the cache's loader threads
        while this thread decodes); forget finished loads that no waiting request wants any more."""
        wanted: dict[str, None] = {}
        for req in queue:
            if len(wanted) >= self.max_loras:
                break
            if req.adapter is not None and req.adapter not in self._installed and not req.finished:
                wanted[req.adapter] = None
        for name in wanted:
            try:
                self._fetch(name)
            except PeftkitError:  # unregistered meanwhile: reported when its request reaches admission
                pass
        for name in [n for n, f in self._fetching.items() if f.done() and n not in wanted]:
            del self._fetching[name]

    def _ready(self, req: Request) -> bool:
        """Start or finish the fetch of ``req``'s adapter; install it when it arrives."""
        name = req.adapter
        assert name is not None
        try:
            future = self._fetch(name)
        except PeftkitError as exc:  # unregistered meanwhile
            self._fail_adapter(name, exc)
            return False
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

    def _row_ids(self, ids: list[int]) -> Tensor | None:
        """The per-row adapter ids, or ``None`` for a batch of base rows only: the plain base forward, without
        the bank's gather (the engine keeps no adapter active, so ``None`` means the base model)."""
        return None if all(i < 0 for i in ids) else torch.tensor(ids)

    def _prefill(self, reqs: list[Request]) -> None:
        """One forward over the new requests' prompts, right-padded (mask 0 on the padding)."""
        lens = [len(r.prompt_ids) for r in reqs]
        longest = max(lens)
        ids = torch.zeros(len(reqs), longest, dtype=torch.long)
        mask = torch.zeros(len(reqs), longest, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, : lens[i]] = torch.tensor(r.prompt_ids)
            mask[i, : lens[i]] = 1
        last = torch.tensor([[n - 1] for n in lens])
        keep_last = self._keeps_logits and all(r.params.prompt_logprobs is None for r in reqs)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            adapter_ids=self._row_ids([self._adapter_id(r.adapter) for r in reqs]),
            use_cache=True,
            return_dict=True,
            **({"logits_to_keep": last} if keep_last else {}),
        )
        kv = _kv_of(_cache_of(out))
        for i, (req, n) in enumerate(zip(reqs, lens)):
            req._kv, req._len = [(k[i : i + 1, :, :n], v[i : i + 1, :, :n]) for k, v in kv], n
            self.metrics["prompt_tokens"] += n
            if req.params.prompt_logprobs is not None:
                self._score_prompt(req, out.logits[i, : n - 1])
            if req.params.max_tokens == 0:  # the prompt only
                self._finish(req, "length")
                continue
            self._emit(req, out.logits[i, 0] if keep_last else out.logits[i, n - 1])

    def _score_prompt(self, req: Request, logits: Tensor) -> None:
        """``req.prompt_logprobs`` from the prefill's logits ``[n - 1, vocab]`` (position j predicts token j+1)."""
        ids, k = req.prompt_ids, req.params.prompt_logprobs or 0
        logp = torch.log_softmax(logits.float(), dim=-1)
        chosen = logp.gather(1, torch.tensor(ids[1:]).view(-1, 1))[:, 0].tolist()
        tops = logp.topk(k, dim=-1) if k else None
        offsets = [len(self._decode_text(ids[:j]).rstrip("\ufffd")) for j in range(len(ids))]
        out = [TokenLogprob(ids[0], self._token_text(ids[0]), None, [], 0)]
        for j, token in enumerate(ids[1:]):
            top = [] if tops is None else self._top(tops.values[j].tolist(), tops.indices[j].tolist())
            out.append(TokenLogprob(token, self._token_text(token), chosen[j], top, offsets[j + 1]))
        req.prompt_logprobs = out

    def _logprob(self, logits: Tensor, token: int, k: int, offset: int) -> TokenLogprob:
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = self._top(*(t.tolist() for t in logp.topk(k))) if k else []
        return TokenLogprob(token, self._token_text(token), float(logp[token]), top, offset)

    def _top(self, values: list[float], indices: list[int]) -> list[tuple[int, str, float]]:
        return [(i, self._token_text(i), v) for v, i in zip(values, indices)]

    def _decode(self) -> None:
        batch = [r for r in self.running if not r.finished]
        if not batch:
            self._batch, self._batch_cache = [], None
            return
        if self._batch_cache is None or {id(r) for r in batch} != {id(r) for r in self._batch}:
            self._rebuild_batch_cache(batch)
        batch = self._batch
        lens = [r._len for r in batch]
        mask = torch.cat([self._batch_mask, self._batch_mask.new_ones(len(batch), 1)], dim=1)
        out = self.model(
            input_ids=torch.tensor([[r.output_ids[-1]] for r in batch]),
            attention_mask=mask,
            position_ids=torch.tensor([[n] for n in lens]),
            adapter_ids=self._row_ids([self._adapter_id(r.adapter) for r in batch]),
            use_cache=True,
            return_dict=True,
            **{self._cache_kw: self._batch_cache},
        )
        self._batch_cache, self._batch_mask = _cache_of(out), mask
        self.metrics["decode_steps"] += 1
        logits = out.logits[:, -1]
        # one argmax for every greedy row (a per-row argmax over the vocabulary costs ~35 us each)
        greedy = logits.argmax(-1).tolist() if any(r.params.temperature == 0 for r in batch) else []
        for i, req in enumerate(batch):
            req._len += 1
            self._emit(req, logits[i], greedy[i] if req.params.temperature == 0 else None)

    def _rebuild_batch_cache(self, batch: list[Request]) -> None:
        """Stack the caches of ``batch`` into one left-padded cache and its attention mask; ``self._batch``
        becomes the rows' order in it (the requests already in the previous cache first, then the new ones).

        Only needed when the batch changes (a request joined or left): otherwise the cache the previous decode
        step returned is passed on as is. Rows that stay are taken out of the previous batched cache with one
        ``index_select`` per layer (keeping its last ``longest`` positions: each row's own positions are its
        last ``_len``); new rows bring their own prefill cache."""
        from transformers import DynamicCache

        previous = {id(r): i for i, r in enumerate(self._batch)}
        old = _kv_of(self._batch_cache) if self._batch_cache is not None else []
        stay = [r for r in batch if r._kv is None]
        new = [r for r in batch if r._kv is not None]
        longest = max(r._len for r in batch)
        rows = torch.tensor([previous[id(r)] for r in stay], dtype=torch.long)
        n_layers = len(old) if old else len(new[0]._kv or [])
        layers = []
        for layer in range(n_layers):
            pair = []
            for j in range(2):  # keys, values
                parts = [_left_pad(old[layer][j].index_select(0, rows), longest)] if stay else []
                parts += [_left_pad(r._kv[layer][j], longest) for r in new]  # type: ignore[index]
                pair.append(torch.cat(parts) if len(parts) > 1 else parts[0])
            layers.append((pair[0], pair[1]))
        batch = stay + new  # the rows' order in the stacked cache (the decode step follows it)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for i, r in enumerate(batch):
            mask[i, longest - r._len :] = 1
            r._kv = None  # it lives in the batched cache now
        self._batch, self._batch_cache, self._batch_mask = list(batch), DynamicCache(ddp_cache_data=layers), mask

    def _emit(self, req: Request, logits: Tensor, token: int | None = None) -> None:
        """Take ``token`` (or sample one from ``logits``) as the next token and update the request's text,
        finishing it if due."""
        if self.record_logits:
            req.logits.append(logits.detach().clone())
        if token is None:
            token = sample(logits, req.params, req._gen)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        p = req.params
        reason = None
        if token == eos and not p.ignore_eos:
            reason = "stop"
        else:
            if p.logprobs is not None:
                req.logprobs.append(self._logprob(logits, token, p.logprobs, req._stable))
            req.output_ids.append(token)
            self.metrics["tokens_generated"] += 1
            self._token_times.append(time.monotonic())
        full = self._decode_text(req.output_ids)
        req._stable = len(full) - _trailing_replacements(full)  # where the next token's text starts
        cut = min((i for i in (full.find(s) for s in p.stop if s) if i >= 0), default=-1)
        if cut >= 0:
            full, reason = full[:cut], "stop"
            if req.logprobs:
                req.logprobs = [lp for lp in req.logprobs if lp.offset < cut]
        elif reason is None and (
            (p.max_tokens is not None and len(req.output_ids) >= p.max_tokens)
            or (self.max_len is not None and len(req.prompt_ids) + len(req.output_ids) >= self.max_len)
        ):
            reason = "length"
        req.text = full
        # Held back until the next token: the end of the text while a stop string may be starting there, and
        # trailing U+FFFD characters, which byte-level BPE tokenizers (GPT-2, Llama 3, Qwen) decode while a
        # multi-byte UTF-8 character is split across tokens and which become that character once its last
        # byte arrives (as vLLM's and TGI's detokenizers do). A finished request flushes everything, so a
        # byte sequence that stays invalid reaches the client as the replacement character the text has.
        hold = 0 if reason else max(max((len(s) - 1 for s in p.stop), default=0), _trailing_replacements(full))
        upto = max(req._emitted, len(full) - hold)
        delta, req._emitted = full[req._emitted : upto], upto
        if reason:
            self._finish(req, reason, delta)
        elif req.on_event is not None and delta:
            try:
                req.on_event(req, delta, False)
            except Exception:  # a broken listener must not stop the engine
                pass

    def _finish(self, req: Request, reason: str, delta: str = "") -> None:
        req.finish_reason = reason
        req._kv = None
        counter = {"error": "requests_failed", "cancelled": "requests_cancelled"}.get(reason, "requests_finished")
        self.metrics[counter] += 1
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
        with self._queue_lock:
            failed = [r for r in self.waiting if r.adapter == name]
            for req in failed:
                self.waiting.remove(req)
        for req in failed:
            self._fail(req, exc)

    def _retire(self) -> None:
        self.running = [r for r in self.running if not r.finished]
        in_use = {r.adapter for r in self.running}
        for name in [n for n in self._unload_later if n not in in_use]:
            self._unload_later.discard(name)
            if name in self._installed:
                self._remove(name)

    def _prompt_ids(self, prompt: str | list[int], reserve: int = 0, special: bool = False) -> list[int]:
        """Token ids of a prompt; ``InvalidConfigError`` if it is empty or leaves fewer than ``reserve``
        positions of the model's context."""
        ids = list(prompt) if isinstance(prompt, list) else self._encode(prompt, special)
        if not ids:
            raise InvalidConfigError("the prompt is empty")
        if self.max_len is not None and len(ids) + reserve > self.max_len:
            raise InvalidConfigError(f"the input has {len(ids)} tokens; the model's context is {self.max_len}")
        return ids

    def _encode(self, text: str, special: bool = False) -> list[int]:
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=special))
        except TypeError:
            return list(self.tokenizer.encode(text))

    def _token_text(self, token: int) -> str:
        """One token's text, special tokens included (a logprob names the token that was drawn)."""
        try:
            return self.tokenizer.decode([token], skip_special_tokens=False)
        except TypeError:
            return self.tokenizer.decode([token])

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
        self._stop = self._closed = False
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

    def stop(self, drain: bool = False, timeout: float = 60.0) -> None:
        """Stop the background loop. With ``drain``, first refuse new requests (:class:`EngineClosedError`)
        and let the queued and running ones finish (graceful shutdown), for at most ``timeout`` seconds;
        whatever is left then fails with :class:`EngineClosedError`."""
        if drain:
            self._closed = True
            deadline = time.monotonic() + timeout
            while self.has_work() and time.monotonic() < deadline:
                if self._thread is None:
                    self.step()
                else:
                    time.sleep(0.01)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if drain:
            with self._lock:
                with self._queue_lock:
                    left, self.waiting = [*self.waiting, *self.running], deque()
                self.running = []
                for req in left:  # outside the queue lock: a listener may call submit (and get EngineClosedError)
                    self._fail(req, EngineClosedError("the engine stopped before the request finished"))


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


def _config_of(entry: CachedAdapter) -> AdapterConfig:
    return get_method(entry.meta["method"]).config_class.from_dict(entry.meta["config"])


def _trailing_replacements(text: str) -> int:
    """How many U+FFFD replacement characters end ``text`` (an incomplete UTF-8 sequence decodes to them)."""
    return len(text) - len(text.rstrip("\ufffd"))


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "past_key_values", None)
    return cache if cache is not None else getattr(out, "cache", None)


def _kv_of(cache: Any) -> KV:
    """Per-layer ``(key, value)`` tensors of a transformers ``DynamicCache``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _pad_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def _left_pad(t: Tensor, length: int) -> Tensor:
    """``t`` ``[batch, heads, L, dim]`` cut or zero-padded on the left to ``length`` positions."""
    missing = length - t.shape[2]
    if missing <= 0:
        return t[:, :, -missing:] if missing else t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], missing, t.shape[3]), t], dim=2)
