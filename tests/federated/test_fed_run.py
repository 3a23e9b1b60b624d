"""peftkit.federated.run on Flower's simulation engine (Ray, ~40 s to start): a 2-client, 1-round Fed-SB run end to
end (files, per-round rows, the global R equals the mean of the uploaded R to 1e-7, bytes per client = L·r² + head,
the saved adapter reloads to the same model); slow: FedEx-LoRA over 2 rounds with a client that drops out in
round 1, FedAvg-LoRA with DP-SGD and user-level DP. Bad settings fail before Ray starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _fed_data import tiny_setup

import peftkit as pk
from peftkit.federated.errors import EmptyClientError, PrivacyBudgetError, UnknownStrategyError
from peftkit.federated.privacy import PrivacySettings, UserPrivacy

pytest.importorskip("ray")
from peftkit.federated.run import Federation, federate
from peftkit.train.build import load_base
from peftkit.train.settings import RunSpec

QUIET = {"log": lambda message: None}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_setup(tmp_path_factory.mktemp("fed-run"))


def run(files: tuple[Path, Path], out: Path, **kw):
    bert, data = files
    settings = {"strategy": "fedsb", "clients": 2, "rounds": 1, "split": "iid", "model": str(bert), "data": str(data),
                "r": 4, "batch_size": 8, "lr": 1e-2, **QUIET, **kw}  # fmt: skip
    return federate(out, **settings)


def test_two_clients_one_round_of_fedsb_end_to_end(files, tmp_path: Path) -> None:
    result = run(files, tmp_path / "fed")
    out = result.output_dir
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "federation.json", "metrics.jsonl", "metrics.png"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows == result.rounds
    assert rows[1]["failures"] == []
    assert rows[1]["clients"] == 2 and rows[1]["train_loss"] > 0
    r2_and_head = (4 * 4 * 4 + 2 * 32 + 2) * 4  # L·r² + the head, float32
    assert rows[1]["upload_bytes_per_client"] == rows[1]["download_bytes_per_client"] == r2_and_head
    assert rows[1]["setup_bytes"] == 2 * 4 * (4 * 32 + 32 * 4) * 4  # A and B once per client
    assert rows[1]["cumulative_bytes"] == 2 * 2 * r2_and_head + rows[1]["setup_bytes"]
    # the global adapter is the mean of what the clients uploaded (exact: Fed-SB averages R)
    uploads = result.strategy.client_states
    global_state = result.model.adapter_state_dict("default")
    for key in uploads[0]:
        torch.testing.assert_close(global_state[key], (uploads[0][key] + uploads[1][key]) / 2, rtol=0, atol=1e-7)
    settings = json.loads((out / "federation.json").read_text())
    assert settings["strategy"] == "fedsb" and settings["client_sizes"] == [36, 36] and settings["status"] == "complete"
    assert settings["metrics"]["accuracy"] == rows[1]["accuracy"]
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the saved adapter reloads onto a fresh base to the same model
    base, _, _ = load_base(RunSpec.from_dict(settings["run"]), progress=False)
    reloaded = pk.load(base, out / "adapter").eval()
    assert not result.model.training
    ids = torch.tensor([[2, 9, 14, 30, 3]])
    torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits)


@pytest.mark.slow
def test_fedex_with_a_client_dropping_out(files, tmp_path: Path) -> None:
    result = run(files, tmp_path / "fedex", strategy="fedex", rounds=2, drop={1: 1})
    rows = result.rounds
    assert [r["clients"] for r in rows] == [0, 1, 2]
    failure = rows[1]["failures"]
    assert len(failure) == 1 and "client 1 dropped out in round 1" in failure[0]["reason"]
    assert rows[2]["failures"] == [] and 0 < rows[2]["aggregation_error"] < 1
    # round 2: client 0 holds the round-1 residual and gets the increment; client 1 failed and gets it whole
    assert result.strategy.version == 2
    base = load_base(RunSpec.from_dict(result.settings["run"]), progress=False)[0]
    saved = pk.load(base, result.output_dir / "adapter")
    assert saved.adapter_names == ["default", "fedex_residual"] and saved.active_adapters == saved.adapter_names


@pytest.mark.slow
def test_fedavg_with_dp_sgd_and_user_level_dp(files, tmp_path: Path) -> None:
    privacy = PrivacySettings(epsilon=8.0, max_grad_norm=1.0)
    result = run(files, tmp_path / "dp", strategy="fedavg", rounds=2, privacy=privacy,
                 user_privacy=UserPrivacy(noise_multiplier=0.01, clipping_norm=10.0))  # fmt: skip
    eps = [r["epsilon"] for r in result.rounds[1:]]
    assert 0 < eps[0] < eps[1] <= 8.0 + 0.01  # grows per round, the target is met at the end
    assert result.settings["noise_multipliers"][0] > 0 and 0 < result.rounds[2]["aggregation_error"]


def test_bad_settings_fail_before_any_training(files, tmp_path: Path) -> None:
    bert, data = files
    common = {"model": str(bert), "data": str(data), "r": 4, "batch_size": 8, **QUIET}
    with pytest.raises(UnknownStrategyError, match="unknown federated strategy 'fedsgd'"):
        Federation(tmp_path, strategy="fedsgd", **common)
    with pytest.raises(EmptyClientError, match="would get"):
        Federation(tmp_path, strategy="fedsb", clients=100, split="iid", **common)
    with pytest.raises(PrivacyBudgetError, match="no noise level reaches epsilon=1e-06"):
        Federation(tmp_path, strategy="fedsb", clients=2, rounds=50, split="iid",
                   privacy=PrivacySettings(epsilon=1e-6, delta=1e-5), **common)  # fmt: skip
    with pytest.raises(ValueError, match="user-level DP"):
        Federation(tmp_path, strategy="fedex", clients=2, split="iid",
                   user_privacy=UserPrivacy(noise_multiplier=1.0), **common)  # fmt: skip
    assert not any(tmp_path.iterdir())  # nothing written
