"""peftkit.federated.inprocess and federate(engine="inprocess"): the same strategy and ClientApp without Ray (a
2-client, 2-round Fed-SB run with a client that drops out in round 1: files, failure reported, the global R is the
mean of the uploads to 1e-7); the job clients receive follows changes made after the strategy was built; slow: the
in-process run equals the Ray simulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _fed_data import tiny_setup

pytest.importorskip("flwr")

from flwr.app import ConfigRecord

from peftkit.federated import flower
from peftkit.federated.errors import FederatedOptionError
from peftkit.federated.inprocess import InProcessGrid, server_identity
from peftkit.federated.privacy import UserPrivacy
from peftkit.federated.run import Federation, federate

QUIET = {"log": lambda message: None}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_setup(tmp_path_factory.mktemp("fed-inprocess"))


def settings(files: tuple[Path, Path], **kw) -> dict:
    bert, data = files
    return {"strategy": "fedsb", "clients": 2, "rounds": 2, "split": "iid", "model": str(bert), "data": str(data),
            "r": 4, "batch_size": 8, "lr": 1e-2, **QUIET, **kw}  # fmt: skip


def test_the_job_clients_get_follows_later_changes(files, tmp_path: Path) -> None:
    fed = Federation(tmp_path / "out", **settings(files))
    fed.job.threads = 1  # what federate() sets for Ray's one-CPU workers, after the strategy exists
    with server_identity():
        messages = list(fed.strategy.configure_train(1, flower.to_record(fed.trained), ConfigRecord({}),
                                                     InProcessGrid(flower.client_app, 2)))  # fmt: skip
    for message in messages:
        assert flower.job_from_json(message.content[flower.JOB_STATE]["job"]).threads == 1


def test_an_inprocess_run_with_a_client_dropping_out(files, tmp_path: Path) -> None:
    result = federate(tmp_path / "fed", engine="inprocess", drop={1: 1}, **settings(files))
    out = result.output_dir
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "federation.json", "metrics.jsonl", "metrics.png"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == result.rounds and [r["round"] for r in rows] == [0, 1, 2]
    assert [r["clients"] for r in rows] == [0, 1, 2]
    (failure,) = rows[1]["failures"]
    assert failure["node"] == 2 and failure["reason"] == "client 1 dropped out in round 1 (failure injection)"
    assert rows[2]["failures"] == [] and rows[2]["train_loss"] > 0
    r2_and_head = (4 * 4 * 4 + 2 * 32 + 2) * 4  # L·r² + the head, float32
    assert rows[2]["upload_bytes_per_client"] == r2_and_head
    # the failed client is set up again in round 2 (A and B resent), the other is not
    assert rows[2]["setup_bytes"] == 4 * (4 * 32 + 32 * 4) * 4
    uploads = result.strategy.client_states
    global_state = result.model.adapter_state_dict("default")
    assert len(uploads) == 2
    for key in uploads[0]:
        torch.testing.assert_close(global_state[key], (uploads[0][key] + uploads[1][key]) / 2, rtol=0, atol=1e-7)
    assert result.metrics["accuracy"] == rows[2]["accuracy"]


def test_an_unknown_engine_is_refused(files, tmp_path: Path) -> None:
    with pytest.raises(FederatedOptionError, match="unknown engine 'ray'"):
        federate(tmp_path / "x", engine="ray", **settings(files))
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_the_inprocess_run_equals_the_simulation(files, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    torch.set_num_threads(1)  # Ray's clients train with one thread
    a = federate(tmp_path / "sim", **settings(files, strategy="fedavg"))
    b = federate(tmp_path / "inp", engine="inprocess", **settings(files, strategy="fedavg"))
    for ra, rb in zip(a.rounds, b.rounds, strict=True):
        assert ra["cumulative_bytes"] == rb["cumulative_bytes"]
        assert ra["eval_loss"] == pytest.approx(rb["eval_loss"], rel=1e-5)
    sa, sb = a.model.adapter_state_dict("default"), b.model.adapter_state_dict("default")
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=1e-4, atol=1e-5 * float(sa[key].abs().max()))


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_user_level_dp_clips_each_update_and_noises_the_mean(files, tmp_path: Path, sigma: float) -> None:
    clip = 1e-3  # far below the size of a round's update at lr 1e-2, so every client's update is clipped
    fed = Federation(tmp_path / "out", **settings(files, strategy="fedavg", rounds=1),
                     user_privacy=UserPrivacy(noise_multiplier=sigma, clipping_norm=clip))  # fmt: skip
    start = {k: v.clone() for k, v in fed.trained.items()}
    with server_identity():
        fed.run_server(InProcessGrid(flower.client_app, 2))
    final = flower.from_record(fed.final_arrays)
    move = torch.cat([(final[k] - start[k]).flatten().double() for k in start]).norm().item()
    # Flower's wrapper clips each reply's update before our aggregation sees it: every norm is the clip exactly
    # (an update of lr 1e-2 steps is far larger; an unclipped one would not land on 1e-3)
    for upload in fed.strategy.client_states:
        norm = torch.cat([(upload[k] - start[k]).flatten().double() for k in start]).norm().item()
        assert norm == pytest.approx(clip, rel=1e-5)
    if sigma == 0:
        assert 0 < move <= clip * (1 + 1e-5)  # the mean of updates clipped to norm <= clip
    else:  # plus N(0, (σ·clip / clients)²) per value: its norm is about sqrt(n)·σ·clip/2
        n = sum(t.numel() for t in start.values())
        assert 0.5 * n**0.5 * sigma * clip / 2 < move < 1.5 * n**0.5 * sigma * clip / 2 + clip


@pytest.mark.parametrize("strategy", ["fedex", "ffa"])
def test_the_server_counts_what_a_client_trains(files, tmp_path: Path, strategy: str) -> None:
    # FedEx-LoRA's frozen residual and FFA-LoRA's frozen A used to be counted as trainable in the run's log line
    logged: list[str] = []
    fed = Federation(tmp_path / "out", **settings(files, strategy=strategy, rounds=1, log=logged.append))
    uploaded = sum(t.numel() for t in fed.trained.values())
    assert fed.model.trainable_parameters().trainable == uploaded
    assert f"trainable params: {uploaded:,}" in logged[-1]
