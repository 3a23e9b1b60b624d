"""benchmarks/bench_federated.py at toy sizes (tiny BERT, 2 clients, 1 round, in process). Fast: the four strategies
(Fed-SB's and FedEx-LoRA's aggregates equal the exact average of the clients' updates to 1e-6 relative,
FedAvg-LoRA reports a nonzero cross term, bytes per client = the strategies' formulas, table and plot). Slow: the
whole script, centralised runs and one DP run per strategy included, JSON / tables / plots, and --merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _fed_data import tiny_setup
from _scripts import load_script

pytest.importorskip("flwr")

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    return load_script("benchmarks/bench_federated.py")


def toy_argv(bert: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """The benchmark's arguments at toy sizes (``--threads``: this process's own count, left as it is)."""
    argv = ["--model", str(bert), "--data", str(data), "--clients", "2", "--rounds", "1", "--train", "40",
            "--eval", "20", "--r-sb", "4", "--r-lora", "2", "--lr", "1e-2", "--out", str(out),
            "--threads", str(torch.get_num_threads())]  # fmt: skip
    return argv + list(extra)


def test_the_four_strategies_at_toy_sizes(tmp_path: Path) -> None:
    bench = load_bench()
    bert, data = tiny_setup(tmp_path, n=60)
    out = tmp_path / "fed.json"
    results = bench.main(toy_argv(bert, data, out, "--no-centralised", "--dp-epsilon"))
    (block,) = results["datasets"].values()
    runs = {r["name"]: r for r in block["federated"]}
    assert list(runs) == ["Fed-SB", "FedAvg-LoRA", "FFA-LoRA", "FedEx-LoRA"] and block["centralised"] == []
    assert runs["Fed-SB"]["exactness"] <= 1e-6 and runs["FedEx-LoRA"]["exactness"] <= 1e-6
    assert runs["FedAvg-LoRA"]["aggregation_error"] > 1e-4
    assert runs["Fed-SB"]["upload_adapter_bytes_per_client_per_round"] == 4 * 4 * 4 * 4  # 4 layers, r_SB² floats
    assert runs["FedAvg-LoRA"]["upload_adapter_bytes_per_client_per_round"] == 4 * 2 * (32 + 32) * 4
    assert "| Fed-SB | 4 |" in out.with_suffix(".md").read_text()
    assert out.with_name("fed_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_benchmark_at_toy_sizes(tmp_path: Path) -> None:
    bench = load_bench()
    bert, data = tiny_setup(tmp_path, n=60)
    out = tmp_path / "res" / "fed.json"
    argv = ["--model", str(bert), "--data", str(data), "--clients", "2", "--rounds", "1", "--train", "40",
            "--eval", "20", "--r-sb", "4", "--r-lora", "2", "--lr", "1e-2", "--dp-epsilon", "8", "--out", str(out),
            "--threads", str(torch.get_num_threads())]  # fmt: skip
    results = bench.main(argv)  # --threads: this process's thread count stays as it is
    assert json.loads(out.read_text()) == results
    for suffix in ("_accuracy.png", "_dp.png"):
        assert Path(f"{out.with_suffix('')}{suffix}").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = out.with_suffix(".md").read_text()
    assert "| Fed-SB | 4 |" in table and "| centralised LoRA-SB (union, 1 epochs) | 4 |" in table
    (block,) = results["datasets"].values()
    runs = {r["name"]: r for r in block["federated"]}
    assert list(runs) == ["Fed-SB", "FedAvg-LoRA", "FFA-LoRA", "FedEx-LoRA"]
    assert runs["Fed-SB"]["exactness"] <= 1e-6 and runs["FedEx-LoRA"]["exactness"] <= 1e-6
    assert runs["FedAvg-LoRA"]["aggregation_error"] > 1e-4
    layers, d = 4, 32  # the tiny BERT: query and value in 2 layers, hidden 32
    assert runs["Fed-SB"]["upload_adapter_bytes_per_client_per_round"] == layers * 4 * 4 * 4
    assert runs["FedAvg-LoRA"]["upload_adapter_bytes_per_client_per_round"] == layers * 2 * (d + d) * 4
    assert runs["FFA-LoRA"]["upload_adapter_bytes_per_client_per_round"] == layers * d * 2 * 4
    assert all(len(r["accuracy"]) == 2 and r["failures"] == [] for r in runs.values())
    assert [r["name"] for r in block["centralised"]] == ["LoRA", "LoRA-SB"]
    assert all(r["client_sizes"] == [40] for r in block["centralised"])
    dp = {r["name"]: r for r in results["dp"]}
    assert set(dp) == {"Fed-SB", "FedAvg-LoRA"}
    assert all(0 < r["epsilon"][-1] <= 8.0 + 1e-6 for r in dp.values())
    assert not out.with_suffix(".partial.json").exists()
    # parts merge into one result (nothing is run again); a later part's run replaces the same run of an earlier one
    again = {**results, "datasets": {k: {"federated": v["federated"][3:], "centralised": []}
                                     for k, v in results["datasets"].items()}}  # fmt: skip
    again["datasets"][next(iter(again["datasets"]))]["federated"][0]["final_accuracy"] = -1.0
    (tmp_path / "again.json").write_text(json.dumps(again))
    merged = bench.main(["--merge", str(out), str(tmp_path / "again.json"), "--out", str(tmp_path / "merged.json")])
    (block,) = merged["datasets"].values()
    assert [r["name"] for r in block["federated"]] == ["Fed-SB", "FedAvg-LoRA", "FFA-LoRA", "FedEx-LoRA"]
    assert block["federated"][3]["final_accuracy"] == -1.0 and len(block["centralised"]) == 2
    assert merged["dp"] == results["dp"]
    table = (tmp_path / "merged.md").read_text()
    assert table.count("| centralised LoRA (union") == 1 and table.count("| Fed-SB | 4 | 8 |") == 1
