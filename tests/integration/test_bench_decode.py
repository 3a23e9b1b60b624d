"""Smoke run of the decode-shaped mixed-batch benchmark (``benchmarks/mixed_decode.py``, issue 19) at toy sizes:
every path (base, peftkit's kernel, its gather path, PEFT) runs, the kernel and the gather path agree, and the
recorded figures are per-round ratios with their spread."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
mixed_decode = pytest.importorskip("mixed_decode")


def test_decode_benchmark_runs_every_path(monkeypatch) -> None:
    pytest.importorskip("peft")
    monkeypatch.setattr(mixed_decode, "WIDTH", 48)
    monkeypatch.setattr(mixed_decode, "DEPTH", 2)
    monkeypatch.setattr(mixed_decode, "ROWS", [6])
    monkeypatch.setattr(mixed_decode, "ADAPTERS", [3])
    monkeypatch.setattr(mixed_decode, "MIXED_RANKS", [1, 4])
    monkeypatch.setattr(mixed_decode, "EXTRA_CASES", [(7, 4, True, 0.0), (8, 3, False, 0.25)])
    res = mixed_decode.bench_mlp(repeats=3)
    labels = [(c["rows"], c["adapters"], str(c["ranks"]), c["base_rows"]) for c in res["cases"]]
    assert labels == [(6, 3, "8", 0.0), (7, 4, "[1, 4]", 0.0), (8, 3, "8", 0.25)]
    for c in res["cases"]:
        assert set(c["vs_base"]) == {"peftkit", "peftkit_gather", "peft"}
        for r in [*c["vs_base"].values(), *c["cpu_vs_base"].values()]:
            assert 0 < r["p10"] <= r["median"] <= r["p90"]
        assert c["kernel_vs_gather_max_rel_diff"] < 1e-5
        assert len(c["load_avg_1min"]) == 2


def test_ratios_are_per_round_medians() -> None:
    times = {"base": [1.0, 2.0, 4.0], "a": [1.5, 2.0, 8.0]}
    r = mixed_decode.ratios(times)["a"]
    assert r == {"median": 1.5, "p10": 1.0, "p90": 2.0}
