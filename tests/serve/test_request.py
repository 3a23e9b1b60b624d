"""``Request`` (``peftkit.serve.request``): a request and its result, without KV state (issue 13, item 5)."""

from __future__ import annotations

import dataclasses

from peftkit.serve.request import Request


def test_request_holds_no_kv_state() -> None:
    fields = {f.name for f in dataclasses.fields(Request)}
    assert not fields & {"_kv", "_len"}  # the batch's cache keeps it (peftkit.serve.kv.BatchedKV)


def test_a_broken_listener_does_not_propagate() -> None:
    seen = []

    def listener(req: Request, delta: str, done: bool) -> None:
        seen.append((delta, done))
        raise RuntimeError("client gone")

    req = Request("x", on_event=listener)
    req.notify("ab", False)
    req.notify("", True)
    assert seen == [("ab", False), ("", True)]
    assert not req.finished and not req.wait(0)
