"""peftkit.federated.deploy: the Flower app folder (components, settings with DP round-trip, a valid FAB); slow: a
SuperLink and two SuperNodes as separate processes on loopback run a 1-round Fed-SB federation submitted over the
Control API, and every process is gone afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _fed_data import tiny_setup

pytest.importorskip("flwr")

from peftkit.federated import deploy
from peftkit.federated.privacy import PrivacySettings, UserPrivacy


def test_app_folder_names_the_apps_and_keeps_the_settings(tmp_path: Path) -> None:
    from flwr.cli.build import build_fab_from_disk

    dp = {"privacy": PrivacySettings(epsilon=4.0), "user_privacy": UserPrivacy(noise_multiplier=0.5)}
    app = deploy.write_app(tmp_path / "app", tmp_path / "out", strategy="ffa", clients=3, drop={1: 2}, **dp)
    toml = (app / "pyproject.toml").read_text()
    assert 'serverapp = "peftkit.federated.deploy:server_app"' in toml
    assert 'clientapp = "peftkit.federated.flower:client_app"' in toml
    settings = deploy._read_settings(app / "settings.json")
    assert settings["privacy"] == PrivacySettings(epsilon=4.0) and settings["drop"] == {1: 2}
    assert settings["user_privacy"] == UserPrivacy(noise_multiplier=0.5)
    assert settings["output_dir"] == str((tmp_path / "out").resolve()) and settings["strategy"] == "ffa"
    assert json.loads(toml.rpartition("settings = ")[2]) == str((app / "settings.json").resolve())
    assert len(build_fab_from_disk(app)) > 0


@pytest.mark.slow
def test_a_federation_of_separate_processes_on_loopback(tmp_path: Path) -> None:
    bert, data = tiny_setup(tmp_path)
    local = deploy.LocalDeployment(clients=2, home=tmp_path / "flwr-home")
    with local:
        record = deploy.deploy(tmp_path / "out", superlink=local.superlink, timeout=600, strategy="fedsb", clients=2,
                               rounds=1, split="iid", model=str(bert), data=str(data), r=4, batch_size=8)  # fmt: skip
        processes = list(local.processes)
    assert record["status"] == "complete" and record["strategy"] == "fedsb"
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients"] == 2 and rows[1]["failures"] == []
    assert rows[1]["upload_bytes_per_client"] == (4 * 4 * 4 + 2 * 32 + 2) * 4
    assert (tmp_path / "out" / "adapter" / "adapter.json").is_file()
    assert len(processes) == 3 and all(p.poll() is not None for p in processes)  # SuperLink + 2 SuperNodes stopped
    assert (tmp_path / "flwr-home" / "logs" / "supernode-1.log").is_file()
