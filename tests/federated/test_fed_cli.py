"""``peftkit federate`` (peftkit/cli/federate.py): bad input is one line ``error: ...`` with exit code 1 before any
training (unknown strategy, a split that leaves a client empty, an unreachable epsilon); slow: a 2-client, 1-round
run through the command writes its folder and reports accuracy and bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _fed_data import tiny_setup
from typer.testing import CliRunner

from peftkit.cli import app

pytest.importorskip("flwr")
runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_setup(tmp_path_factory.mktemp("fed-cli"))


def federate(files: tuple[Path, Path], out: Path, *args: str):
    bert, data = files
    return runner.invoke(app, ["federate", "--output-dir", str(out), "--model", str(bert), "--data", str(data),
                               "--r", "4", "--batch-size", "8", *args])  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--strategy", "fedprox"], "error: unknown federated strategy 'fedprox'; strategies: fedsb, fedavg, ffa, fedex"),
     (["--clients", "500", "--split", "iid"], "error: client(s) [72, 73, 74, 75, 76] would get [0, 0, 0, 0, 0]"),
     (["--split", "random"], "error: unknown split 'random'"),
     (["--clients", "2", "--split", "iid", "--rounds", "50", "--dp-epsilon", "1e-6", "--dp-delta", "1e-5"],
      "error: no noise level reaches epsilon=1e-06")],
)  # fmt: skip
def test_bad_input_is_one_line(files, tmp_path: Path, args: list[str], message: str) -> None:
    result = federate(files, tmp_path / "out", *args)
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out" / "adapter").exists()


@pytest.mark.slow
def test_a_run_through_the_command(files, tmp_path: Path) -> None:
    result = federate(files, tmp_path / "out", "--clients", "2", "--rounds", "1", "--split", "iid", "--lr", "1e-2")
    assert result.exit_code == 0, result.output
    assert "held-out accuracy:" in result.output and "bytes sent per client per round" in result.output
    settings = json.loads((tmp_path / "out" / "federation.json").read_text())
    assert settings["strategy"] == "fedsb" and settings["rounds"] == 1


def test_a_run_through_the_command_in_process(files, tmp_path: Path) -> None:
    result = federate(files, tmp_path / "out", "--engine", "inprocess", "--clients", "2", "--rounds", "1",
                      "--split", "iid", "--lr", "1e-2")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "held-out accuracy:" in result.output and "bytes sent per client per round" in result.output
    assert (tmp_path / "out" / "adapter").is_dir()


def test_an_unknown_engine_is_a_usage_error(files, tmp_path: Path) -> None:
    result = federate(files, tmp_path / "out", "--engine", "ray")
    assert result.exit_code == 2 and "'ray' is not one of" in result.output
