"""The scheduler: continuous batching (requests join and leave between decode steps), cancelling, and a waiting
queue that never waits for a running step."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_util import check, merged_reference, setup_engine, warm

from peftkit.errors import InvalidConfigError
from peftkit.serve.engine import Request, SamplingParams


def test_continuous_batching_and_slot_eviction(tmp_path: Path) -> None:
    """Requests join between decode steps; with max_loras=1 adapters cycle through the one slot."""
    engine, paths, make = setup_engine(tmp_path, "llama", max_loras=2, max_prefills_per_step=1)
    plan = [("hello", "ad0"), ("abc", "ad1"), ("zz", None), ("qq q", "ad2"), ("k", "ad0"), ("long prompt", "ad1")]
    reqs = []
    for prompt, adapter in plan:
        reqs.append(engine.submit(Request(prompt, adapter=adapter, params=SamplingParams(max_tokens=4 + len(reqs)))))
        engine.step()
    while engine.has_work():
        engine.step()
        assert len(engine.installed) <= 2
    for r in reqs:
        check(r, merged_reference(make, paths.get(r.adapter or ""), r.prompt, r.params.max_tokens))
    assert engine.metrics["adapter_unloads"] >= 1


def test_request_joins_the_running_batch(tmp_path: Path) -> None:
    """Continuous batching: a request submitted while another decodes is admitted at the next step and decoded
    in the same batch, and both still equal their references."""
    engine, paths, make = setup_engine(tmp_path, "llama")
    warm(engine, "ad0", "ad1")
    first = engine.submit(Request("hello", adapter="ad0", params=SamplingParams(max_tokens=10)))
    engine.step()
    engine.step()
    assert engine.running == [first] and len(first.output_ids) == 3
    late = engine.submit(Request("late one", adapter="ad1", params=SamplingParams(max_tokens=4)))
    steps = engine.metrics["decode_steps"]
    engine.step()  # admits (prefills) `late`, then one decode step over both rows
    assert engine.running == [first, late] and not first.finished
    assert len(first.output_ids) == 4 and len(late.output_ids) == 2
    assert engine.metrics["decode_steps"] == steps + 1
    while engine.has_work():
        engine.step()
    check(first, merged_reference(make, paths["ad0"], "hello", 10))
    check(late, merged_reference(make, paths["ad1"], "late one", 4))


def test_cancel_removes_request_from_batch(tmp_path: Path) -> None:
    engine, paths, make = setup_engine(tmp_path, "gpt2")
    warm(engine, "ad0", "ad1")
    gone = engine.submit(Request("bye", adapter="ad0", params=SamplingParams(max_tokens=8)))
    stays = engine.submit(Request("stay", adapter="ad1", params=SamplingParams(max_tokens=8)))
    queued = Request("never", params=SamplingParams(max_tokens=8))
    engine.step()
    engine.submit(queued)
    assert engine.cancel(gone) and engine.cancel(queued)
    assert gone.finish_reason == "cancelled" and gone not in engine.running and gone not in engine.scheduler.kv
    assert queued not in engine.waiting and queued.output_ids == []
    assert engine.running == [stays]
    while engine.has_work():
        engine.step()
    assert len(gone.output_ids) == 2  # prefill token + one decode token, then it left the batch
    assert engine.metrics["requests_cancelled"] == 2 and not engine.cancel(stays)
    check(stays, merged_reference(make, paths["ad1"], "stay", 8))


def test_submit_and_cancel_do_not_wait_for_a_running_step(tmp_path: Path) -> None:
    """The waiting queue has its own lock: while a step holds the engine (simulated by holding its step lock
    in another thread), requests still join the queue, waiting ones can be cancelled, and the adapter of a new
    request starts loading at once."""
    import threading

    engine, paths, make = setup_engine(tmp_path, "gpt2")
    held, release = threading.Event(), threading.Event()

    def long_step() -> None:
        with engine._lock:
            held.set()
            release.wait(30)

    blocker = threading.Thread(target=long_step)
    blocker.start()
    try:
        held.wait(10)
        req = engine.submit(Request("hi", adapter="ad1", params=SamplingParams(max_tokens=2)))
        gone = engine.submit(Request("bye", params=SamplingParams(max_tokens=2)))
        assert list(engine.waiting) == [req, gone]
        assert engine.cancel(gone) and gone.finish_reason == "cancelled"
        engine.cache.get_async("ad1").result(10)  # joins (or finds) the load submit started: no second load
        assert engine.cache.stats["misses"] == 1 and engine.cache.resident() == ["ad1"]
    finally:
        release.set()
        blocker.join()
    with pytest.raises(InvalidConfigError, match="submitted already"):
        engine.submit(req)
    while engine.has_work():
        engine.step()
    check(req, merged_reference(make, paths["ad1"], "hi", 2))
