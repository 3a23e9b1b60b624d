"""Smoke run of the kernel-vs-gather sweep of ``benchmarks/mixed_decode.py`` (issue 19) at toy sizes: every
(adapters, rows, tokens per row) case is timed against the gather path and reported as per-round ratios."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
mixed_decode = pytest.importorskip("mixed_decode")


def test_shape_sweep_reports_kernel_over_gather_for_every_shape(monkeypatch) -> None:
    monkeypatch.setattr(mixed_decode, "WIDTH", 40)
    monkeypatch.setattr(mixed_decode, "SHAPES", [(6, 1), (2, 5)])
    res = mixed_decode.bench_shapes([1, 3], depth=2, max_rounds=3)
    got = [(c["adapters"], c["rows"], c["tokens_per_row"]) for c in res["cases"]]
    assert got == [(1, 6, 1), (1, 2, 5), (3, 6, 1), (3, 2, 5)]
    for c in res["cases"]:
        r = c["kernel_over_gather"]
        assert 0 < r["p10"] <= r["median"] <= r["p90"]
        assert set(c["median_ms"]) == {"peftkit", "peftkit_gather"}
