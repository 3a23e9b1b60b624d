"""peftkit.federated.client: a client round trains exactly the strategy's tensors with peftkit's Trainer (Fed-SB: R
and the head, A and B bitwise unchanged; FFA-LoRA: A unchanged), one client equals centralised training with the
same seed, and a client process rebuilds the server's run and refuses another base model."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from _fed_data import tiny_setup
from conftest import tiny_bert

import peftkit as pk
from peftkit.federated.client import ClientJob, ClientRuntime, local_update
from peftkit.train import TrainConfig, Trainer


def _data(n: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(5, 60, (6,), generator=g), "labels": torch.tensor(i % 2)} for i in range(n)]


CONFIG = TrainConfig(batch_size=4, lr=1e-2, progress=False, seed=7)


def test_fedsb_client_trains_only_r_and_the_head() -> None:
    cfg = pk.get_config("lorasb", r=4, targets=["query", "value"], modules_to_save=["classifier"])
    model = pk.adapt(tiny_bert(num_labels=2), cfg)
    state = {k: v.clone() for k, v in model.adapter_state_dict("default").items()}
    result = local_update(model, "fedsb", state, _data(), CONFIG)
    assert sorted({k.rpartition(".")[2] for k in result.state}) == ["R", "bias_delta", "weight_delta"]
    assert sum(t.numel() for t in result.state.values()) == 4 * 4 * 4 + 2 * 32 + 2  # L·r² + head
    after = model.adapter_state_dict("default")
    for key, before in state.items():
        if key.endswith((".A", ".B")):
            assert torch.equal(after[key], before)  # frozen factors bitwise unchanged
        else:
            assert not torch.equal(after[key], before)
    assert result.num_examples == 12 and result.metrics["steps"] == 3 and result.metrics["train_loss"] > 0


def test_ffa_client_keeps_a() -> None:
    model = pk.adapt(tiny_bert(num_labels=2), pk.LoRAConfig(r=4, targets=["query", "value"]))
    state = {k: v.clone() for k, v in model.adapter_state_dict("default").items()}
    result = local_update(model, "ffa", state, _data(), CONFIG)
    assert {k.rpartition(".")[2] for k in result.state} == {"B"}
    after = model.adapter_state_dict("default")
    assert all(torch.equal(after[k], v) for k, v in state.items() if k.endswith(".A"))
    assert all(not torch.equal(after[k], v) for k, v in state.items() if k.endswith(".B"))


def test_one_client_equals_centralised_training() -> None:
    cfg = pk.get_config("lorasb", r=4, targets=["query", "value"], modules_to_save=["classifier"])
    model = pk.adapt(tiny_bert(num_labels=2), cfg)
    reference = copy.deepcopy(model)
    state = {k: v.clone() for k, v in model.adapter_state_dict("default").items()}
    result = local_update(model, "fedsb", state, _data(), CONFIG)
    Trainer(reference, CONFIG, _data()).fit()
    central = reference.adapter_state_dict("default")
    for key, value in result.state.items():
        assert torch.equal(value, central[key]), key


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> ClientJob:
    from peftkit.train.build import build
    from peftkit.train.run import settings_from

    bert, data = tiny_setup(tmp_path_factory.mktemp("fed-client"))
    spec = settings_from(model=str(bert), data=str(data), method="lorasb", r=4, alpha=4.0, batch_size=8)
    built = build(spec, progress=False)
    shards = [list(range(0, len(built.train), 2)), list(range(1, len(built.train), 2))]
    return ClientJob(spec=built.spec.to_dict(), strategy="fedsb", shards=shards, model_digest=built.model_digest,
                     rounds=2, train=dict(built.spec.train))  # fmt: skip


def test_a_client_process_rebuilds_the_run_once(job: ClientJob) -> None:
    runtime = ClientRuntime.get(job)
    assert ClientRuntime.get(job) is runtime
    assert [e.input_ids for e in runtime.shard(1)] == [runtime.built.train[i].input_ids for i in job.shards[1]]
    assert runtime.model.adapter_names == ["default"]
    config = job.train_config(server_round=3, partition=1)
    assert config.seed == 0 + 3000 + 1 and config.progress is False and config.batch_size == 8


def test_a_client_with_another_base_model_is_refused(job: ClientJob, tmp_path: Path) -> None:
    other = ClientJob(**{**job.__dict__, "model_digest": "0" * 64})
    with pytest.raises(ValueError, match="differs from the server's"):
        ClientRuntime.get(other)


def test_fedavg_then_fedex_in_one_process_get_their_own_runtimes(tmp_path: Path) -> None:
    """A process that ran a FedAvg-LoRA client must build FedEx-LoRA's model (with its residual adapter) for a
    FedEx-LoRA run on the same data, not reuse the FedAvg-LoRA one (which made every FedEx-LoRA client fail from
    round 2 in the in-process benchmark: no adapter named 'fedex_residual')."""
    from peftkit.federated.client import RESIDUAL, heads
    from peftkit.train.build import build
    from peftkit.train.run import settings_from

    bert, data = tiny_setup(tmp_path)
    built = build(settings_from(model=str(bert), data=str(data), method="lora", r=4, batch_size=8), progress=False)
    common = {"spec": built.spec.to_dict(), "shards": [list(range(len(built.train)))],
              "model_digest": built.model_digest, "rounds": 1, "train": dict(built.spec.train)}  # fmt: skip
    fedavg = ClientRuntime.get(ClientJob(strategy="fedavg", **common))
    head = heads(fedavg.model)
    lowrank = [p for p in fedavg.model.adapter_modules("default") if p not in head]
    fedex = ClientRuntime.get(ClientJob(strategy="fedex", lowrank=lowrank, **common))
    assert fedex is not fedavg and fedavg.model.adapter_names == ["default"]
    assert fedex.model.adapter_names == ["default", RESIDUAL] and fedex.model.active_adapters == ["default", RESIDUAL]
