"""benchmarks/bench_compress.py without the model runs (those take minutes on SmolLM2): the committed results render
to the README's tables and a PNG, a failed section is reported instead of dropped, and the shared compressor cache
quantises each weight once and returns what the compressor returns."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from _scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    return load_script("benchmarks/bench_compress.py")


def test_committed_results_render_with_every_section_and_a_failed_one_is_reported(tmp_path):
    bench = load_bench()
    results = json.loads((ROOT / "benchmarks" / "results" / "compress.json").read_text())
    assert set(bench.SECTIONS) <= set(results)
    text = bench.render(results)
    for heading in ("## LoRD vs plain SVD", "## PELA", "## EoRA (rank 32)", "## 50% structured pruning",
                    "## LoRAM vs LoRA", "## AFM on a DeepFM"):  # fmt: skip
        assert heading in text
    assert "| hqq3 | EoRA |" in text
    bench.plot(results, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results["eora"] = {"error": "RuntimeError: boom", "section_seconds": 1.0}
    text = bench.render(results)
    assert "**eora failed**: RuntimeError: boom" in text and "## EoRA" not in text
    bench.plot(results, tmp_path / "d.png")  # the plot skips the failed section


def test_the_compressor_cache_calls_the_compressor_once_per_weight(monkeypatch):
    bench = load_bench()
    from peftkit.compress import compressors

    calls = []

    def fake(name, ratio=None):
        def fn(w):
            calls.append(1)
            return w.round()

        return fn

    monkeypatch.setattr(compressors, "get", fake)
    cached = bench._cached("hqq4")
    w = torch.randn(4, 8) * 3
    first, second = cached(w), cached(w.clone())
    assert torch.equal(first, w.round()) and torch.equal(second, w.round()) and len(calls) == 1
    first.zero_()  # a caller changing its copy does not change the cache
    assert torch.equal(cached(w), w.round()) and len(calls) == 1
    cached(w + 1)
    assert len(calls) == 2
