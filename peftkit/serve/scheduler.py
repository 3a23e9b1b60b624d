"""``Scheduler``: mixed-adapter continuous batching, one step at a time.

How a step runs (CPU reference design, chosen for being obviously correct):

1. **Admission.** Waiting requests (FIFO) join the running batch between decode steps (continuous batching, as
   Orca, Yu et al. 2022) once their adapter is in the model (:class:`~peftkit.serve.slots.AdapterSlots`: a
   missing one is fetched in a loader thread meanwhile, and requests for other adapters go ahead). The waiting
   queue has its own short lock: submitting or cancelling never waits for a step to finish.
2. **Prefill** runs the requests admitted in this step together: their prompts are right-padded to the longest,
   with an attention mask that is 0 on the padding (a real token only attends to real tokens before it, so its
   keys, values and logits are what it computes alone), one adapter id per row.
3. **Decode** runs all running requests together on one batched KV cache
   (:class:`~peftkit.serve.kv.BatchedKV`). The ``adapter_ids`` of the rows route each row through its own
   adapter (``AdaptedLayer``'s stacked low-rank bank, or the per-group fallback for adapters without a low-rank
   form); ``-1`` rows are the base model.
4. Each row's next token is chosen (:mod:`peftkit.serve.sampling`) and its text passed on
   (:mod:`peftkit.serve.text`); finished requests leave the batch, and adapters retired meanwhile go out of the
   model once no running request uses them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence

import torch
from torch import Tensor

from peftkit.core.model import AdaptedModel

from .errors import EngineOverloadedError
from .kv import BatchedKV
from .request import Request
from .sampling import prompt_logprobs, sample, token_logprob
from .slots import AdapterSlots
from .text import TextCodec, held_back, stop_cut, trailing_replacements

__all__ = ["Scheduler", "right_padded"]


class Scheduler:
    """The waiting queue and the running batch of one model.

    Args:
        model: the served model (no adapter active: each row picks its own).
        slots: the adapters in the model.
        codec: the tokenizer, and the model's context length.
        max_batch: requests decoded together.
        max_queue: waiting requests; :meth:`enqueue` raises :class:`EngineOverloadedError` beyond it.
        max_prefills_per_step: new requests admitted (and prefilled together) between two decode steps.
        cache_kw: the keyword the model's ``forward`` takes its KV cache by.
        keeps_logits: the model's ``forward`` takes ``logits_to_keep`` (prefill projects only each prompt's last
            position on the vocabulary).
        record_logits: keep every step's logits on the request (tests).
        metrics: the engine's counters (added up here).
        wake: set when a request joins the queue (the background loop waits on it).
    """

    def __init__(
        self,
        model: AdaptedModel,
        slots: AdapterSlots,
        codec: TextCodec,
        *,
        max_batch: int,
        max_queue: int,
        max_prefills_per_step: int,
        cache_kw: str,
        keeps_logits: bool,
        record_logits: bool,
        metrics: dict[str, int],
        wake: threading.Event,
    ) -> None:
        self.model, self.slots, self.codec = model, slots, codec
        self.max_batch, self.max_queue, self.max_prefills_per_step = max_batch, max_queue, max_prefills_per_step
        self.keeps_logits, self.record_logits, self.metrics = keeps_logits, record_logits, metrics
        self.kv = BatchedKV(cache_kw)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._admitting: list[Request] = []
        self.lock = threading.RLock()  # held for a whole step: the model, the running batch, the adapters
        self.queue_lock = threading.Lock()  # held briefly: the waiting queue
        self.wake = wake
        self._token_times: deque[float] = deque(maxlen=1 << 16)  # for tokens_per_second

    # ------------------------------------------------------------------------------------------------ queue
    def enqueue(self, request: Request) -> int:
        """Append ``request`` to the waiting queue (thread-safe, without waiting for a running step); returns the
        queue's length. Raises :class:`EngineOverloadedError` when it is full."""
        with self.queue_lock:
            if len(self.waiting) >= self.max_queue:
                raise EngineOverloadedError(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue})")
            self.waiting.append(request)
            request._submitted = True
            self.metrics["requests_total"] += 1
            queued = len(self.waiting)
        self.wake.set()
        return queued

    def _dequeue(self, req: Request) -> bool:
        """Take ``req`` out of the waiting queue (call with ``queue_lock`` held); ``False`` if it is not there
        (cancelled meanwhile)."""
        try:
            self.waiting.remove(req)
        except ValueError:
            return False
        return True

    def has_work(self) -> bool:
        with self.lock:  # a step moves requests from waiting to running under the step lock
            return bool(self.waiting or self.running)

    def in_use(self) -> set[str | None]:
        """The adapters of the running requests (and of those being admitted in this step)."""
        return {r.adapter for r in (*self.running, *self._admitting)}

    def cancel(self, request: Request) -> bool:
        """Take ``request`` out of the queue or the running batch; its KV cache is freed and the batch goes on
        without it. Returns whether it was still unfinished."""
        if request.finished:  # the common case (stream ended normally): no need to wait for the step lock
            return False
        with self.queue_lock:
            dequeued = self._dequeue(request)
        if dequeued:  # (finished outside the queue lock: its listener may submit again)
            self._finish(request, "cancelled")
            return True
        with self.lock:
            if request.finished:
                return False
            self._finish(request, "cancelled")
            self._retire()
            return True

    def fail_all(self, exc: BaseException, waiting: bool = False) -> None:
        """Fail the running requests (and, with ``waiting``, the queued ones) with ``exc``."""
        with self.lock:
            left = list(self.running)
            if waiting:
                with self.queue_lock:
                    left = [*self.waiting, *left]
                    self.waiting.clear()
            self.running = []
            for req in left:  # outside the queue lock: a listener may call submit
                self._fail(req, exc)

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last ``window`` seconds."""
        since = time.monotonic() - window
        return sum(1 for t in list(self._token_times) if t >= since) / window

    # ------------------------------------------------------------------------------------------------ steps
    @torch.no_grad()
    def step(self) -> bool:
        """Admit waiting requests, then run one decode step over the running batch. Returns whether any work was
        done."""
        with self.lock:
            admitted = self._admit()
            if not self.running:
                return admitted
            self._decode()
            self._retire()
            return True

    def _admit(self) -> bool:
        new: list[Request] = []
        self._admitting = new  # their adapters must stay in the model too (see in_use)
        with self.queue_lock:
            queue = list(self.waiting)
        for req in queue:
            if len(self.running) + len(new) >= self.max_batch or len(new) >= self.max_prefills_per_step:
                break
            if self.slots.retiring(req.adapter):
                continue  # the model still holds the previous version of its adapter, in use by running requests
            if req.adapter is not None and req.adapter not in self.slots and not self._ready(req.adapter):
                continue
            with self.queue_lock:
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

    def _ready(self, name: str) -> bool:
        """Whether adapter ``name`` is in the model (installed now if it has arrived); its waiting requests fail
        if it cannot be fetched or installed."""
        try:
            return self.slots.ready(name, self.in_use())
        except Exception as exc:
            self._fail_adapter(name, exc)
            return False

    def _prefetch(self, queue: list[Request]) -> None:
        """Start loading the first ``max_loras`` distinct adapters waiting in ``queue``, so that they are in memory
        when their requests reach the front (loads run in the cache's loader threads while this thread decodes)."""
        wanted: dict[str, None] = {}
        for req in queue:
            if len(wanted) >= self.slots.max_loras:
                break
            if req.adapter is not None and req.adapter not in self.slots and not req.finished:
                wanted[req.adapter] = None
        self.slots.prefetch(wanted)

    def _row_ids(self, reqs: Sequence[Request]) -> Tensor | None:
        """The rows' adapter ids, or ``None`` for a batch of base rows only: the plain base forward, without the
        bank's gather (no adapter is active, so ``None`` means the base model)."""
        ids = [self.slots.adapter_id(r.adapter) for r in reqs]
        return None if all(i < 0 for i in ids) else torch.tensor(ids)

    def _prefill(self, reqs: list[Request]) -> None:
        """One forward over the new requests' prompts, right-padded (mask 0 on the padding)."""
        lens = [len(r.prompt_ids) for r in reqs]
        ids, mask = right_padded([r.prompt_ids for r in reqs], 0)
        keep_last = self.keeps_logits and all(r.params.prompt_logprobs is None for r in reqs)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            adapter_ids=self._row_ids(reqs),
            use_cache=True,
            return_dict=True,
            **({"logits_to_keep": torch.tensor([[n - 1] for n in lens])} if keep_last else {}),
        )
        self.kv.add_prefill(reqs, out, lens)
        for i, (req, n) in enumerate(zip(reqs, lens)):
            self.metrics["prompt_tokens"] += n
            k = req.params.prompt_logprobs
            if k is not None:  # position j predicts token j+1
                offsets = self.codec.offsets(req.prompt_ids)
                logits = out.logits[i, : n - 1]
                req.prompt_logprobs = prompt_logprobs(req.prompt_ids, logits, k, offsets, self.codec.token_text)
            if req.params.max_tokens == 0:  # the prompt only
                self._finish(req, "length")
                continue
            self._emit(req, out.logits[i, 0] if keep_last else out.logits[i, n - 1])

    def _decode(self) -> None:
        batch = [r for r in self.running if not r.finished]
        if not batch:
            self.kv.clear()
            return
        rows, inputs = self.kv.step_inputs(batch)
        out = self.model(
            input_ids=torch.tensor([[r.output_ids[-1]] for r in rows]),
            adapter_ids=self._row_ids(rows),
            use_cache=True,
            return_dict=True,
            **inputs,
        )
        self.kv.advance(out, inputs)
        self.metrics["decode_steps"] += 1
        logits = out.logits[:, -1]
        # one argmax for every greedy row (a per-row argmax over the vocabulary costs ~35 us each)
        greedy = logits.argmax(-1).tolist() if any(r.params.temperature == 0 for r in rows) else []
        for i, req in enumerate(rows):
            self._emit(req, logits[i], greedy[i] if req.params.temperature == 0 else None)

    def _emit(self, req: Request, logits: Tensor, token: int | None = None) -> None:
        """Take ``token`` (or sample one from ``logits``) as the next token and update the request's text,
        finishing it if due."""
        if self.record_logits:
            req.logits.append(logits.detach().clone())
        if token is None:
            token = sample(logits, req.params, req._gen)
        p = req.params
        reason = None
        if token == self.codec.eos_token_id and not p.ignore_eos:
            reason = "stop"
        else:
            if p.logprobs is not None:
                req.logprobs.append(token_logprob(logits, token, p.logprobs, req._stable, self.codec.token_text))
            req.output_ids.append(token)
            self.metrics["tokens_generated"] += 1
            self._token_times.append(time.monotonic())
        full = self.codec.decode(req.output_ids)
        req._stable = len(full) - trailing_replacements(full)  # where the next token's text starts
        cut = stop_cut(full, p.stop)
        max_len = self.codec.max_len
        if cut >= 0:
            full, reason = full[:cut], "stop"
            if req.logprobs:
                req.logprobs = [lp for lp in req.logprobs if lp.offset < cut]
        elif reason is None and (
            (p.max_tokens is not None and len(req.output_ids) >= p.max_tokens)
            or (max_len is not None and len(req.prompt_ids) + len(req.output_ids) >= max_len)
        ):
            reason = "length"
        req.text = full
        # A finished request flushes everything, so a byte sequence that stays invalid reaches the client as the
        # replacement character the text has.
        hold = 0 if reason else held_back(full, p.stop)
        upto = max(req._emitted, len(full) - hold)
        delta, req._emitted = full[req._emitted : upto], upto
        if reason:
            self._finish(req, reason, delta)
        elif delta:
            req.notify(delta, False)

    def _finish(self, req: Request, reason: str, delta: str = "") -> None:
        req.finish_reason = reason
        self.kv.drop(req)
        counter = {"error": "requests_failed", "cancelled": "requests_cancelled"}.get(reason, "requests_finished")
        self.metrics[counter] += 1
        req._done.set()
        req.notify(delta, True)

    def _fail(self, req: Request, exc: BaseException) -> None:
        req.error = exc
        self._finish(req, "error")

    def _fail_adapter(self, name: str, exc: BaseException) -> None:
        with self.queue_lock:
            failed = [r for r in self.waiting if r.adapter == name]
            for req in failed:
                self.waiting.remove(req)
        for req in failed:
            self._fail(req, exc)

    def _retire(self) -> None:
        self.running = [r for r in self.running if not r.finished]
        self.slots.release({r.adapter for r in self.running})


def right_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Token id rows right-padded with ``pad`` to the longest, and their attention mask (0 on the padding)."""
    lens = [len(r) for r in rows]
    ids = torch.full((len(rows), max(lens)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : lens[i]] = torch.tensor(row)
        mask[i, : lens[i]] = 1
    return ids, mask
