"""``peftkit.merge.lorahub``: composition of LoRAs, few-shot weight search, identities of the objective."""

from __future__ import annotations

import pytest
import torch
from _helpers import adapted, delta, rel
from conftest import make_tiny_net

import peftkit as pk
from peftkit.merge import MergeError, MergeOptionError
from peftkit.merge.lorahub import compose, lorahub

TARGETS = ["fc1", "fc2"]


def _hub(ranks=(2, 2, 2), alphas=(4.0, 2.0, 8.0)) -> pk.AdaptedModel:
    return adapted(
        make_tiny_net(),
        {f"l{i}": pk.LoRAConfig(r=r, alpha=a, targets=TARGETS) for i, (r, a) in enumerate(zip(ranks, alphas))},
    )


@pytest.mark.parametrize("how", ["factors", "delta"])
def test_one_hot_weights_give_that_lora_and_zero_the_base(how: str) -> None:
    model = _hub()
    names = model.adapter_names
    for j in range(3):
        w = [1.0 if i == j else 0.0 for i in range(3)]
        model.load_tensors(f"hot{j}", *compose(model, names, w, how))
        for path in TARGETS:
            assert rel(delta(model, f"hot{j}", path), delta(model, names[j], path)) < 1e-6
    model.load_tensors("zero", *compose(model, names, [0.0] * 3, how))
    assert all(float(delta(model, "zero", p).abs().max()) == 0.0 for p in TARGETS)


def test_factors_compose_with_cross_terms_and_delta_without() -> None:
    model = _hub(alphas=(2.0, 2.0, 2.0))  # equal scales: the official (Σ w B)(Σ w A) times s
    names = model.adapter_names
    w = [0.5, -0.7, 1.2]
    model.load_tensors("f", *compose(model, names, w, "factors"))
    model.load_tensors("d", *compose(model, names, w, "delta"))
    for path in TARGETS:
        mods = [model.adapter_modules(n)[path] for n in names]
        a = sum(wi * m.A for wi, m in zip(w, mods))
        b = sum(wi * m.B for wi, m in zip(w, mods))
        assert rel(delta(model, "f", path), 1.0 * (b @ a).detach()) < 1e-6  # s = alpha / r = 1
        assert rel(delta(model, "d", path), sum(wi * delta(model, n, path) for wi, n in zip(w, names))) < 1e-6


def _task(model: pk.AdaptedModel, target: list[float]):
    """Few-shot regression examples whose targets are the outputs of the Σ target_i ΔW_i composition."""
    model.load_tensors("teacher", *compose(model, model.adapter_names, target, "delta"))
    model.set_adapter("teacher")
    x = torch.randint(0, 40, (12, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = model(x)
    model.delete_adapter("teacher")
    return [{"x": x[:6], "y": y[:6]}, {"x": x[6:], "y": y[6:]}]


def _mse(model, batch):
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


def test_search_finds_weights_that_beat_the_base_and_is_reproducible() -> None:
    model = _hub()
    names = model.adapter_names
    batches = _task(model, [1.0, 0.0, -0.5])
    result = lorahub(model, names, batches, loss_fn=_mse, compose_with="delta", budget=60, l1=0.0, seed=1)
    assert len(result.history) == 61 and result.history[0] == result.base_value
    assert result.value < 0.05 * result.base_value  # the teacher's composition is reachable
    assert all(abs(v) <= 1.5 for v in result.weights.values())
    # 60 evaluations in 3 dimensions land near the teacher's weights (the loss is 20x below the base's)
    assert result.weights["l0"] == pytest.approx(1.0, abs=0.3) and result.weights["l2"] == pytest.approx(-0.5, abs=0.3)
    assert model.active_adapters == ["lorahub"]
    # the adapter left in the model has the best weights: its loss is the reported objective
    with torch.no_grad():
        loss = sum(float(_mse(model, b)) * 6 for b in batches) / 12
    assert loss == pytest.approx(result.value, rel=1e-5)
    again = lorahub(model, names, batches, loss_fn=_mse, compose_with="delta", budget=60, l1=0.0, seed=1, new_name="b")
    assert again.weights == result.weights


def test_objective_at_zero_is_the_base_loss_and_l1_is_added() -> None:
    model = _hub()
    names = model.adapter_names
    batches = _task(model, [0.3, 0.3, 0.3])
    with torch.no_grad(), model.adapters_disabled():
        base = sum(float(_mse(model, b)) * 6 for b in batches) / 12
    result = lorahub(model, names, batches, loss_fn=_mse, budget=8, l1=0.05, activate=False)
    assert result.base_value == pytest.approx(base, rel=1e-6)
    assert result.value <= result.base_value  # never worse than the base (w = 0 is kept otherwise)
    with torch.no_grad():
        model.set_adapter("lorahub")
        loss = sum(float(_mse(model, b)) * 6 for b in batches) / 12
    penalty = 0.05 * sum(abs(v) for v in result.weights.values()) / 3
    assert result.value == pytest.approx(loss + penalty, rel=1e-5)


def test_bad_requests() -> None:
    model = _hub(ranks=(2, 3, 2))
    names = model.adapter_names
    with pytest.raises(MergeError, match=r"compose='factors' needs equal ranks, got \[2, 3\]"):
        lorahub(model, names, [], loss_fn=_mse)
    assert "lorahub" not in model.adapter_names
    with pytest.raises(MergeOptionError, match="budget must be a positive int"):
        lorahub(model, names, [], loss_fn=_mse, budget=0)
    with pytest.raises(MergeOptionError, match="compose_with must be"):
        lorahub(model, names, [], compose_with="sum")  # type: ignore[arg-type]
