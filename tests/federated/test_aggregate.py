"""peftkit.federated.aggregate: Fed-SB and FedEx-LoRA are exact (the aggregate's weights equal the average of the
clients' adapted weights), FedAvg-LoRA's error is its cross term, FFA-LoRA averages B over a shared A; on raw
factors and on real peftkit adapters (delta_weight of the loaded aggregate)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert

import peftkit as pk
from peftkit.federated.aggregate import (
    aggregation_error,
    average,
    check_compatible,
    cross_term,
    fedavg,
    fedex,
    fedsb,
    ffa,
    lowrank_paths,
    normalized_weights,
)
from peftkit.federated.client import add_residual, set_residual
from peftkit.federated.errors import AdapterMismatchError, FederatedOptionError


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def lorasb_states(c: int = 4, r: int = 6, d: int = 40, k: int = 24) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(r, k, generator=g), torch.randn(d, r, generator=g)
    return [{"m.A": a, "m.B": b, "m.R": torch.randn(r, r, generator=g), "head.weight_delta": torch.randn(3, k,
             generator=g)} for _ in range(c)]  # fmt: skip


def lora_states(c: int = 4, r: int = 6, d: int = 40, k: int = 24) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [{"m.A": torch.randn(r, k, generator=g), "m.B": torch.randn(d, r, generator=g)} for _ in range(c)]


@pytest.mark.parametrize("weights", [None, [1.0, 3.0, 2.0, 4.0]])
def test_fedsb_is_exact_on_factors(weights) -> None:
    states = lorasb_states()
    p = normalized_weights(4, weights)
    agg = fedsb(states, weights).state
    a, b = states[0]["m.A"], states[0]["m.B"]
    exact = sum(w * b @ s["m.R"] @ a for w, s in zip(p, states))
    assert rel(b @ agg["m.R"] @ a, exact) <= 1e-6
    assert torch.equal(agg["m.A"], a) and torch.equal(agg["m.B"], b)
    assert agg.keys() == states[0].keys()
    torch.testing.assert_close(agg["head.weight_delta"], sum(w * s["head.weight_delta"] for w, s in zip(p, states)))
    # FedAvg-LoRA on the same clients with their own factors B·R (a LoRA-style product) is not exact
    products = [{"m.A": a, "m.B": b @ s["m.R"]} for s in states]
    assert rel(products[0]["m.B"] @ a, exact) > 1e-2


def test_fedavg_error_equals_its_cross_term() -> None:
    states, s = lora_states(), 0.5
    agg = fedavg(states, scales=s)
    a_mean = sum(x["m.A"] for x in states) / 4
    b_mean = sum(x["m.B"] for x in states) / 4
    torch.testing.assert_close(agg.state["m.A"], a_mean)
    torch.testing.assert_close(agg.state["m.B"], b_mean)
    exact = sum(s * x["m.B"] @ x["m.A"] for x in states) / 4
    error = exact - s * b_mean @ a_mean
    got = agg.residual["m"].dense()
    assert rel(got, error) <= 1e-6
    assert rel(s * b_mean @ a_mean, exact) > 0.1  # the gap is real
    assert aggregation_error(states, None, agg.residual, s) == pytest.approx(float(error.norm() / exact.norm()), 1e-6)
    assert agg.residual["m"].up.shape == (40, 4 * 6)  # rank <= c·r, kept factored


def test_cross_term_weighted_matches_definition() -> None:
    states, weights = lora_states(c=3), [1.0, 2.0, 5.0]
    p = normalized_weights(3, weights)
    res = cross_term(states, weights, {"m": 2.0})["m"].dense()
    exact = sum(w * 2.0 * x["m.B"] @ x["m.A"] for w, x in zip(p, states))
    b_bar, a_bar = sum(w * x["m.B"] for w, x in zip(p, states)), sum(w * x["m.A"] for w, x in zip(p, states))
    assert rel(res, exact - 2.0 * b_bar @ a_bar) <= 1e-6


def test_ffa_averages_b_over_a_shared_a_exactly() -> None:
    states = lora_states()
    for s in states[1:]:
        s["m.A"] = states[0]["m.A"]
    agg = ffa(states)
    exact = sum(s["m.B"] @ s["m.A"] for s in states) / 4
    assert rel(agg.state["m.B"] @ agg.state["m.A"], exact) <= 1e-6
    assert not agg.residual
    states[2]["m.A"] = states[2]["m.A"] + 1e-3
    with pytest.raises(AdapterMismatchError, match=r"FFA-LoRA needs the same frozen A on every client.*client 2"):
        ffa(states)


def test_fedsb_refuses_clients_with_other_frozen_factors() -> None:
    states = lorasb_states()
    states[3]["m.B"] = states[3]["m.B"].clone()
    states[3]["m.B"][0, 0] += 1
    with pytest.raises(AdapterMismatchError, match=r"Fed-SB needs the same frozen B.*client 3"):
        fedsb(states)


def _clients(model: pk.AdaptedModel, c: int, trained: tuple[str, ...], seed: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    base = model.adapter_state_dict("default")
    out = []
    for _ in range(c):
        out.append({k: v + 0.1 * torch.randn(v.shape, generator=g) if k.rpartition(".")[2] in trained
                    or k.startswith("classifier") else v.clone() for k, v in base.items()})  # fmt: skip
    return out


def _deltas(model: pk.AdaptedModel, name: str = "default") -> dict[str, torch.Tensor]:
    return {p: m.delta_weight(model.base_view(p)).detach().clone() for p, m in model.adapter_modules(name).items()}


def test_fedsb_aggregate_of_real_lorasb_adapters_is_the_mean_update() -> None:
    cfg = pk.get_config("lorasb", r=4, targets=["query", "value"], modules_to_save=["classifier"])
    model = pk.adapt(tiny_bert(num_labels=2), cfg)
    states = _clients(model, 3, ("R",))
    per_client = []
    for s in states:
        model.assign_tensors("default", s)
        per_client.append(_deltas(model))
    model.assign_tensors("default", fedsb(states).state)
    for path, got in _deltas(model).items():
        exact = sum(d[path] for d in per_client) / 3
        torch.testing.assert_close(got, exact, rtol=0, atol=1e-6 * float(exact.abs().max()))


def test_fedex_folds_the_residual_so_weights_are_exactly_averaged() -> None:
    cfg = pk.LoRAConfig(r=4, alpha=8, targets=["query", "value"], modules_to_save=["classifier"])
    model = pk.adapt(tiny_bert(num_labels=2), cfg)
    states = _clients(model, 3, ("A", "B"))
    per_client = []
    for s in states:
        model.assign_tensors("default", s)
        per_client.append(_deltas(model))
    scales = {p: m.lowrank(model.base_view(p)).scale for p, m in model.adapter_modules("default").items()
              if p != "classifier"}  # fmt: skip
    assert sorted(scales) == sorted(lowrank_paths(states[0]))
    agg = fedex(states, scales=scales)
    paths = list(scales)
    add_residual(model, paths)
    set_residual(model, {p: r.dense() for p, r in agg.residual.items()})
    model.assign_tensors("default", agg.state)
    folded, adapter = _deltas(model, "fedex_residual"), _deltas(model)
    for path in paths:
        exact = sum(d[path] for d in per_client) / 3
        got = folded[path] + adapter[path]
        torch.testing.assert_close(got, exact, rtol=0, atol=1e-6 * float(exact.abs().max()))
        assert rel(adapter[path], exact) > 1e-3  # without the residual it is FedAvg-LoRA, which is not exact


def test_clients_with_other_ranks_or_targets_are_refused() -> None:
    a = pk.adapt(tiny_bert(num_labels=2), pk.LoRAConfig(r=4, targets=["query", "value"])).adapter_state_dict("default")
    b = pk.adapt(tiny_bert(num_labels=2), pk.LoRAConfig(r=2, targets=["query", "value"])).adapter_state_dict("default")
    c = pk.adapt(tiny_bert(num_labels=2), pk.LoRAConfig(r=4, targets=["query"])).adapter_state_dict("default")
    with pytest.raises(
        AdapterMismatchError, match=r"client 1's .*\.A' has shape \(2, 32\), client 0's \(4, 32\).*rank"
    ):
        check_compatible([a, b])
    with pytest.raises(AdapterMismatchError, match="client 1 adapts other modules than client 0 \\(targets differ\\)"):
        fedavg([a, c])
    assert isinstance(AdapterMismatchError("x"), ValueError)


def test_weights_are_checked() -> None:
    states = lora_states(c=2)
    with pytest.raises(FederatedOptionError, match="got 3 weights for 2 client states"):
        average(states, [1, 2, 3])
    with pytest.raises(FederatedOptionError, match="not all zero"):
        average(states, [0, 0])
    with pytest.raises(FederatedOptionError, match="at least one"):
        check_compatible([])
    assert normalized_weights(2, [1, 3]) == [0.25, 0.75]
