"""The serving engine's decode steps (one token per request) go through the core's C++ mixed-batch kernel
(issue 19), and every row still equals its own merged model."""

from __future__ import annotations

from pathlib import Path

import pytest
from _kernel_calls import count_kernel_calls
from serve_util import PROMPTS, check, merged_reference, setup_engine

from peftkit.core import bgmv
from peftkit.serve.engine import Request, SamplingParams


@pytest.mark.skipif(not bgmv.available(), reason=f"C++ kernel not built: {bgmv.status()}")
def test_engine_decode_steps_run_through_the_kernel(tmp_path: Path, monkeypatch) -> None:
    calls = count_kernel_calls(monkeypatch)
    engine, paths, make = setup_engine(tmp_path, "llama")
    lora = [name for name in paths if name != "ad2"]  # ad2 is DoRA: no low-rank form, its layers run per group
    names = [*lora, None]
    reqs = [
        Request(p, adapter=names[i % len(names)], params=SamplingParams(max_tokens=5)) for i, p in enumerate(PROMPTS)
    ]
    engine.generate(reqs)
    decode = [(tokens, rows) for tokens, rows in calls if tokens == rows]
    assert decode and max(rows for _, rows in decode) > 1  # decode steps of several rows, one token each
    for r in reqs:
        check(r, merged_reference(make, paths.get(r.adapter or ""), r.prompt, 5))
