"""peftkit.federated.strategies: the four strategies' trained tensors match their communication formulas on a real
model (what a client uploads per layer: Fed-SB r², FFA-LoRA d·r, FedAvg/FedEx-LoRA r(d+k)), unknown names are
refused."""

from __future__ import annotations

import pytest
from conftest import tiny_bert

import peftkit as pk
from peftkit.federated.client import freeze_for, heads, split_state
from peftkit.federated.errors import UnknownStrategyError
from peftkit.federated.strategies import STRATEGIES, get_strategy


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_uploaded_tensors_match_the_payload_formula(name: str) -> None:
    spec = get_strategy(name)
    r = 4
    config = pk.get_config(spec.method, r=r, alpha=float(r), targets=["query", "value", "dense"],
                           modules_to_save=["classifier"])  # fmt: skip
    model = pk.adapt(tiny_bert(num_labels=2), config)
    head_paths = heads(model)
    assert head_paths == ["classifier"]
    trained, frozen = split_state(model.adapter_state_dict("default"), spec, head_paths)
    head = sum(t.numel() for k, t in trained.items() if k.startswith("classifier."))
    assert head == 2 * 32 + 2
    expected = 0
    for path in model.layer_paths["default"]:
        if path == "classifier":
            continue
        base = model.base_view(path)
        d, k = base.out_features, base.in_features
        up, down = spec.payload(d, k, r, 5)
        expected += up
        if name == "fedex":  # download adds the residual: factored c·r(d+k) or dense d·k, whichever is smaller
            assert down - up == min(
                base.out_features * base.in_features, 5 * r * (base.out_features + base.in_features)
            )
        else:
            assert down == up
    assert sum(t.numel() for t in trained.values()) - head == expected
    # the tensors a client trains are exactly the uploaded ones
    params = freeze_for(model, spec)
    assert sum(p.numel() for p in params) == sum(t.numel() for t in trained.values())
    assert model.trainable_parameters().trainable == sum(t.numel() for t in trained.values())
    if name in ("fedsb", "ffa"):
        assert frozen and all(k.rpartition(".")[2] in ("A", "B") for k in frozen)
    else:
        assert not frozen


def test_fedsb_sends_far_less_than_lora_at_equal_rank() -> None:
    fedsb, fedavg = get_strategy("fedsb"), get_strategy("fedavg")
    d = k = 384  # MiniLM's attention projections
    assert fedavg.payload(d, k, 8, 10)[0] / fedsb.payload(d, k, 8, 10)[0] == 96.0  # r(d+k) / r² = (d+k)/r


def test_unknown_strategy() -> None:
    with pytest.raises(UnknownStrategyError, match="unknown federated strategy 'fedprox'; strategies: fedsb, fedavg"):
        get_strategy("fedprox")
    assert isinstance(UnknownStrategyError("x"), KeyError)
    assert str(UnknownStrategyError("plain message")) == "plain message"
    assert get_strategy(" FedSB ").name == "fedsb"
