"""peftkit.federated.flower without Ray: the strategy's messages (frozen tensors and the job once per client, FedEx-
LoRA's residual as increments), its aggregate equals the mean of the replies to 1e-7, a failed client does not
break the round and is reported, a client whose frozen tensors differ is refused; the ClientApp's train handler
on a real client context."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _fed_data import tiny_setup

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from peftkit.federated import flower
from peftkit.federated.errors import AdapterMismatchError
from peftkit.federated.privacy import PrivacySettings
from peftkit.federated.run import Federation

NODES = [11, 22]


class Grid:
    """What FedAvg's sampling reads from a Flower grid: the connected node ids."""

    def get_node_ids(self) -> list[int]:
        return list(NODES)


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower stamps messages with the running task's identity; outside a run, set one."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_setup(tmp_path_factory.mktemp("fed-flower"))


def federation(files: tuple[Path, Path], tmp_path: Path, strategy: str = "fedsb", **kw) -> Federation:
    bert, data = files
    return Federation(tmp_path / "out", strategy=strategy, clients=2, rounds=2, split="iid", model=str(bert),
                      data=str(data), r=4, batch_size=8, lr=1e-2, log=lambda m: None, **kw)  # fmt: skip


def reply(message: Message, state: dict[str, torch.Tensor], hash_: int, n: int = 10) -> Message:
    metrics = flower.MetricRecord({"num-examples": n, "train-loss": 0.5, "steps": 2, "frozen-hash": hash_})
    return Message(content=RecordDict({"arrays": flower.to_record(state), "metrics": metrics}), reply_to=message)


def perturbed(trained: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g) for k, v in trained.items()}


def test_setup_goes_once_and_the_aggregate_is_the_mean(files, tmp_path: Path) -> None:
    fed = federation(files, tmp_path)
    strategy = fed.strategy
    arrays = flower.to_record(fed.trained)
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({}), Grid()))
    assert sorted(m.metadata.dst_node_id for m in messages) == NODES
    for m in messages:
        assert set(m.content.array_records) == {"arrays", "setup"}
        assert {k.rpartition(".")[2] for k in m.content["setup"]} == {"A", "B"}
        assert "job" in m.content[flower.JOB_STATE]
    r2 = 4 * 4 * 4  # four adapted layers, r² entries each
    info = strategy.rounds[1]
    assert info["download"] == {n: (r2 + 2 * 32 + 2) * 4 for n in NODES}
    assert info["setup"] == {n: flower.payload_bytes(strategy.frozen) for n in NODES}
    states = [perturbed(fed.trained, s) for s in (1, 2)]
    replies = [reply(m, s, strategy.frozen_hash) for m, s in zip(messages, states)]
    agg, metrics = strategy.aggregate_train(1, replies)
    got = flower.from_record(agg)
    for key in got:
        torch.testing.assert_close(got[key], (states[0][key] + states[1][key]) / 2, rtol=0, atol=1e-7)
    assert info["upload"] == {n: (r2 + 2 * 32 + 2) * 4 for n in NODES} and info["failures"] == []
    assert metrics["train-loss"] == 0.5 and metrics["num-examples"] == 20
    again = list(strategy.configure_train(2, agg, ConfigRecord({}), Grid()))
    assert all(set(m.content.array_records) == {"arrays"} for m in again)  # set up already: nothing frozen resent


def test_a_failed_client_does_not_break_the_round_and_is_reported(files, tmp_path: Path) -> None:
    fed = federation(files, tmp_path)
    strategy = fed.strategy
    messages = list(strategy.configure_train(1, flower.to_record(fed.trained), ConfigRecord({}), Grid()))
    state = perturbed(fed.trained, 3)
    error = Error(code=0, reason="Traceback ...\n  File ...\nMemoryError: client 1 ran out of\n")
    replies = [reply(messages[0], state, strategy.frozen_hash), Message(error, reply_to=messages[1])]
    agg, _ = strategy.aggregate_train(1, replies)
    got = flower.from_record(agg)
    assert all(torch.equal(got[k], state[k]) for k in got)  # the round averaged the one client that answered
    failed = messages[1].metadata.dst_node_id
    assert strategy.rounds[1]["failures"] == [{"node": failed, "reason": "client 1 ran out of"}]
    nxt = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, agg, ConfigRecord({}), Grid())}
    assert "setup" in nxt[failed].content.array_records  # its state is unknown: it is set up again
    assert "setup" not in nxt[messages[0].metadata.dst_node_id].content.array_records
    errors = [Message(Error(code=0, reason="x"), reply_to=m) for m in nxt.values()]
    assert strategy.aggregate_train(2, errors) == (None, None)  # every client failed: keep the global adapter


def test_a_client_with_other_frozen_tensors_is_refused(files, tmp_path: Path) -> None:
    fed = federation(files, tmp_path)
    messages = list(fed.strategy.configure_train(1, flower.to_record(fed.trained), ConfigRecord({}), Grid()))
    replies = [reply(m, fed.trained, fed.strategy.frozen_hash + i) for i, m in enumerate(messages)]
    with pytest.raises(AdapterMismatchError, match="frozen tensors differ from the server's"):
        fed.strategy.aggregate_train(1, replies)


def test_fedex_sends_the_residual_increment_factored(files, tmp_path: Path) -> None:
    fed = federation(files, tmp_path, strategy="fedex")
    strategy = fed.strategy
    messages = list(strategy.configure_train(1, flower.to_record(fed.trained), ConfigRecord({}), Grid()))
    assert all(set(m.content.array_records) == {"arrays", "setup"} for m in messages)  # setup: nothing frozen
    replies = [reply(m, perturbed(fed.trained, s), strategy.frozen_hash) for m, s in zip(messages, (1, 2))]
    agg, _ = strategy.aggregate_train(1, replies)
    assert strategy.version == 1 and 0 < strategy.rounds[1]["aggregation_error"] < 1
    nxt = list(strategy.configure_train(2, agg, ConfigRecord({}), Grid()))
    residual = nxt[0].content["residual"]
    paths = fed.lowrank
    assert sorted(residual) == sorted([f"{p}.up" for p in paths] + [f"{p}.down" for p in paths])
    # per layer min(d·k, c·r(d+k)) = min(32·32, 2·4·64) = 512 values on top of r(d+k) = 256
    per_layer = strategy.rounds[2]["download"][NODES[0]] - flower.payload_bytes(flower.from_record(agg))
    assert per_layer == len(paths) * 512 * 4
    fed.load_global(agg)  # the server's model now holds W0 + residual + s·B̄Ā
    held = fed.model.adapter_state_dict("fedex_residual")
    for path in paths:
        torch.testing.assert_close(held[f"{path}.weight_delta"], strategy.residual[path])


def test_client_train_handler_on_a_client_context(files, tmp_path: Path) -> None:
    fed = federation(files, tmp_path, privacy=PrivacySettings(epsilon=8.0, max_grad_norm=1.0))
    fed.job.drop = {1: 2}
    assert flower.job_from_json(fed.strategy.job_json) == fed.job
    message = next(iter(fed.strategy.configure_train(1, flower.to_record(fed.trained), ConfigRecord({}), Grid())))
    context = Context(run_id=1, node_id=NODES[0], node_config={"partition-id": 1, "num-partitions": 2},
                      state=RecordDict(), run_config={})  # fmt: skip
    out = flower.train(message, context)
    assert not out.has_error() and sorted(out.content["arrays"]) == sorted(fed.trained)
    metrics = out.content["metrics"]
    assert metrics["frozen-hash"] == fed.strategy.frozen_hash and metrics["num-examples"] == len(fed.shards[1])
    assert 0 < metrics["epsilon"] < 8.0  # one of two rounds spent: below the run's target
    assert int(context.state[flower.DP_STATE]["steps"]) == metrics["steps"] > 0
    later = Message(content=RecordDict({"arrays": message.content["arrays"],
                                        "config": ConfigRecord({"server-round": 2})}), dst_node_id=NODES[0],
                    message_type="train")  # fmt: skip
    with pytest.raises(RuntimeError, match="client 1 dropped out in round 2"):  # the job's failure injection
        flower.train(later, context)
