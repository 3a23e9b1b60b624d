"""Adapters with a per-step schedule warn once when a plain training loop never calls ``step_adapters``."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import make_tiny_net

import peftkit as pk


def train(model: pk.AdaptedModel, steps: int, call_hook: bool, accumulate: int = 1) -> list[str]:
    """A plain PyTorch loop; returns the warnings it raised."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(0, 40, (4, 6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            for _ in range(accumulate):
                model(batch).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            if call_hook:
                model.step_adapters(step + 1)
    return [str(w.message) for w in caught if "step_adapters" in str(w.message)]


@pytest.mark.parametrize("method", ["dylora", "sora", "increlora", "dvlora"])
def test_scheduled_method_without_the_hook_warns_once(method: str) -> None:
    model = pk.adapt(make_tiny_net(), pk.get_config(method, r=2, targets=["fc1", "fc2"], seed=0))
    found = train(model, steps=4, call_hook=False)
    assert len(found) == 1 and f"method {method!r}" in found[0]


@pytest.mark.parametrize("method", ["dylora", "sora"])
def test_no_warning_with_the_hook_or_with_gradient_accumulation(method: str) -> None:
    model = pk.adapt(make_tiny_net(), pk.get_config(method, r=2, targets=["fc1", "fc2"], seed=0))
    assert train(model, steps=4, call_hook=True, accumulate=3) == []


def test_methods_without_a_schedule_never_warn() -> None:
    model = pk.adapt(make_tiny_net(), pk.LoRAConfig(r=2, targets=["fc1", "fc2"]))
    assert train(model, steps=4, call_hook=False) == []
