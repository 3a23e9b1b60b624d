"""``Engine``: one frozen causal LM serving many adapters in mixed, continuously batched decode steps.

The engine puts the serving parts together and is what callers use: requests go in with :meth:`Engine.submit`
(thread-safe) and run in :meth:`Engine.step` (a background thread with :meth:`Engine.start`); adapters are
registered, replaced and unregistered with :meth:`Engine.load_adapter` / :meth:`Engine.unload_adapter`. The parts:

- :mod:`peftkit.serve.cache`: adapters paged from disk into CPU memory (LRU by bytes);
- :mod:`peftkit.serve.slots`: the adapters in the model (LRU, in-use guard, reuse of evicted modules, rank check,
  SVD conversion of adapters without a low-rank form, :func:`peftkit.interop.svd.svd_lowrank`);
- :mod:`peftkit.serve.scheduler`: admission, prefill and batched decode steps;
- :mod:`peftkit.serve.kv`: the running batch's KV cache;
- :mod:`peftkit.serve.sampling` and :mod:`peftkit.serve.text`: the next token, its log-probabilities, the text.

The same engine also embeds and classifies (:meth:`Engine.embed`, :meth:`Engine.classify`) with the model it
holds: an encoder (``BertModel``, e.g. the packaged all-MiniLM-L6-v2, or a sequence classifier) or a causal LM
whose last hidden state is mean-pooled (decision: mean pooling over the real tokens, then L2 normalisation, as
sentence-transformers' MiniLM does and OpenAI's unit-length embeddings are).
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.core.errors import AdapterExistsError, AdapterNotFoundError, InvalidConfigError, PeftkitError
from peftkit.core.model import AdaptedModel
from peftkit.interop.svd import SVDLowRank as SVDLowRank  # ("X as X": re-exported, where callers found it)

from .cache import AdapterCache
from .errors import AdapterRankError as AdapterRankError
from .errors import EngineClosedError, EngineOverloadedError
from .request import Request
from .sampling import SamplingParams as SamplingParams
from .sampling import TokenLogprob as TokenLogprob
from .scheduler import Scheduler, right_padded
from .slots import AdapterSlots
from .text import TextCodec, Tokenizer

__all__ = ["Engine", "Tokenizer"]

_METRICS = (
    "requests_total",
    "requests_finished",
    "requests_failed",
    "requests_cancelled",
    "tokens_generated",
    "prompt_tokens",
    "decode_steps",
    "adapter_loads",
    "adapter_unloads",
)


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
            keeps them exact on the per-group fallback path. The worst relative error of each conversion is in
            :attr:`approximation_error`.
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
        # adapter tensors are written only by the slots' installs: mixed batches need not re-check their versions
        self.model.set_static_adapters()
        self.tokenizer = tokenizer
        self.cache = cache
        self.metrics = dict.fromkeys(_METRICS, 0)
        config = getattr(self.model.model, "config", None)
        max_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.codec = TextCodec(tokenizer, max_len)
        self._wake = threading.Event()
        self.slots = AdapterSlots(
            self.model,
            cache,
            max_loras=max_loras,
            max_rank=max_rank,
            svd_rank=svd_rank,
            metrics=self.metrics,
            wake=self._wake.set,
        )
        if cache.validate is None:
            cache.validate = self.slots.check_compatible
        params = inspect.signature(self.model.model.forward).parameters
        self.scheduler = Scheduler(
            self.model,
            self.slots,
            self.codec,
            max_batch=max_batch,
            max_queue=max_queue,
            max_prefills_per_step=max_prefills_per_step,
            cache_kw="cache" if "cache" in params else "past_key_values",
            keeps_logits="logits_to_keep" in params,
            record_logits=record_logits,
            metrics=self.metrics,
            wake=self._wake,
        )
        self._lock = self.scheduler.lock  # held for a whole step: the model, the running batch, the adapters
        self._thread: threading.Thread | None = None
        self._stop = False
        self._closed = False

    # ------------------------------------------------------------------------------------------------ state
    @property
    def max_len(self) -> int | None:
        """The model's context length (``None``: unknown)."""
        return self.codec.max_len

    @property
    def waiting(self) -> deque[Request]:
        """Submitted requests not running yet, oldest first."""
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        """The requests of the running batch."""
        return self.scheduler.running

    @property
    def installed(self) -> list[str]:
        """Adapters now in the model, least recently used first."""
        return self.slots.installed

    @property
    def approximation_error(self) -> dict[str, float]:
        """Adapter -> worst relative Frobenius error of its SVD conversion (``svd_rank``)."""
        return self.slots.approximation_error

    def check_compatible(self, meta: dict[str, Any]) -> None:
        """See :meth:`AdapterSlots.check_compatible` (the cache's ``validate`` hook)."""
        self.slots.check_compatible(meta)

    # --------------------------------------------------------------------------------------------- adapters
    def load_adapter(self, name: str, path: str | Path, *, replace: bool = False) -> bool:
        """Register adapter ``name`` from folder ``path`` (relative paths: relative to the cache's root; a training
        run folder: its adapter) once it is known to work: its files are read and checked against the base, and it
        is installed on trial and taken out again, so an adapter that would fail its requests is refused here and
        nothing changes.

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
        if not replace and name in self.cache:
            raise AdapterExistsError(f"an adapter named {name!r} is already loaded; ask to replace it")
        entry = self.cache.read(name, path)  # (checks the name) outside the step lock: reading may take a while
        with self._lock:
            self.slots.try_install(entry)
            replaced = name in self.cache
            self.cache.put(name, entry, replace=replace)
            self.slots.forget_fetch(name)  # a fetch of the previous version must not be installed
            self.slots.retire(name, self.scheduler.in_use())
        self._wake.set()
        return replaced

    def unload_adapter(self, name: str) -> None:
        """Unregister ``name`` and take it out of the model (after the running requests that use it end)."""
        with self._lock:
            self.cache.unregister(name)
            self.slots.retire(name, self.scheduler.in_use())

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
        request.prompt_ids = self.codec.prompt_ids(request.prompt, reserve=0 if request.params.max_tokens == 0 else 1)
        request._gen = request.params.generator()
        queued = self.scheduler.enqueue(request)  # not the step lock: a request joins the queue while a step runs
        adapter = request.adapter
        if adapter is not None and queued <= self.slots.max_loras and adapter not in self.slots:
            # Load it now, while the running step goes on: otherwise the load would start only when a step
            # sees the request, and it would join one step later than a request for a resident adapter.
            try:
                self.cache.prefetch(adapter)
            except PeftkitError:  # unregistered meanwhile: admission reports it
                pass
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

    def step(self) -> bool:
        """Admit waiting requests, then run one decode step over the running batch. Returns whether any
        work was done."""
        return self.scheduler.step()

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def cancel(self, request: Request) -> bool:
        """Take ``request`` out of the queue or the running batch (a client went away); its KV cache is freed
        and the batch goes on without it. Returns whether it was still unfinished."""
        return self.scheduler.cancel(request)

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last ``window`` seconds."""
        return self.scheduler.tokens_per_second(window)

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
        rows = [self.codec.prompt_ids(x, special=True) for x in inputs]
        entry = self.cache.get(adapter, timeout) if adapter is not None else None
        ids, mask = right_padded(rows, self.codec.pad_id)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if entry is None or self.slots.install(entry, self.scheduler.in_use()):
                    aid = self.slots.adapter_id(adapter)
                    out = self.model(
                        input_ids=ids,
                        attention_mask=mask,
                        adapter_ids=None if aid < 0 else torch.full((len(rows),), aid),
                        output_hidden_states=True,
                        return_dict=True,
                    )
                    self.metrics["prompt_tokens"] += int(mask.sum())
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
                self.scheduler.fail_all(exc)
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
            self.scheduler.fail_all(EngineClosedError("the engine stopped before the request finished"), waiting=True)
