"""AdaptedModel: seeded adapters, adapter_ids by name and order, routing after errors, dtype, wrapping."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyNet, make_tiny_net

import peftkit as pk
from peftkit.core.layer import AdaptedLayer


def _state(model: pk.AdaptedModel) -> dict[str, torch.Tensor]:
    return model.adapter_state_dict("default")


def test_seeded_adapters_are_reproducible() -> None:
    a = _state(pk.adapt(make_tiny_net(), pk.LoRAConfig(r=2, seed=3)))
    torch.manual_seed(123)  # the global RNG state does not matter
    b = _state(pk.adapt(make_tiny_net(), pk.LoRAConfig(r=2, seed=3)))
    c = _state(pk.adapt(make_tiny_net(), pk.LoRAConfig(r=2, seed=4)))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_seeded_adapter_leaves_the_global_rng_alone() -> None:
    net = make_tiny_net()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    pk.adapt(net, pk.LoRAConfig(r=2, seed=3))
    torch.testing.assert_close(torch.rand(3), expected, atol=0, rtol=0)


def _two(token_batch) -> pk.AdaptedModel:
    model = pk.adapt(make_tiny_net(), pk.LoRAConfig(r=2, seed=0), name="a").eval()
    model.add_adapter("b", pk.LoRAConfig(r=2, seed=1))
    with torch.no_grad():
        for name in ("a", "b"):
            for adapter in model.adapter_modules(name).values():
                adapter.B.normal_()
    return model


def test_adapter_ids_as_names(token_batch) -> None:
    model = _two(token_batch)
    by_index = model(token_batch, adapter_ids=torch.tensor([0, 1, -1, 0]))
    by_name = model(token_batch, adapter_ids=["a", "b", None, "a"])
    mixed = model(token_batch, adapter_ids=["a", 1, -1, "a"])
    torch.testing.assert_close(by_name, by_index, atol=0, rtol=0)
    torch.testing.assert_close(mixed, by_index, atol=0, rtol=0)


def test_adapter_ids_follow_the_order_of_adding(token_batch) -> None:
    model = _two(token_batch)
    assert model.adapter_names == ["a", "b"]
    model.delete_adapter("a")
    assert model.adapter_names == ["b"]
    model.set_adapter("b")
    torch.testing.assert_close(model(token_batch, adapter_ids=[0, 0, 0, 0]), model(token_batch), atol=1e-6, rtol=0)


def test_routing_is_reset_after_an_exception_in_forward(token_batch) -> None:
    model = _two(token_batch)
    bad = token_batch.clone()
    bad[0, 0] = 10_000  # out of the embedding's range: the base forward raises mid-call
    with pytest.raises(IndexError):
        model(bad, adapter_ids=[0, 1, -1, 0])
    assert model.routing.call.adapter_ids is None
    model.set_adapter("b")
    want = model(token_batch)
    torch.testing.assert_close(model(token_batch), want, atol=0, rtol=0)  # no stale per-row routing
    torch.testing.assert_close(model(token_batch, adapter_ids=[1, 1, 1, 1]), want, atol=1e-6, rtol=0)


def test_model_to_dtype_converts_base_and_adapters(tiny_net: TinyNet, token_batch) -> None:
    model = pk.adapt(tiny_net, pk.LoRAConfig(r=2, targets=["fc1", "conv"]))
    model.to(torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model(token_batch).dtype == torch.float64


def test_wrappers_never_nest(token_batch) -> None:
    model = _two(token_batch)
    assert not any(isinstance(m.base_layer, AdaptedLayer) for m in model.modules() if isinstance(m, AdaptedLayer))
    assert sorted(model.get_submodule("model.fc1").adapters) == ["a", "b"]
