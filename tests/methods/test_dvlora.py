"""DV-LoRA spec properties: identity at init, exact merge, U/V scale rows, the phase switch changes the
requires_grad set (and the gradients) exactly as described."""

from __future__ import annotations

import torch
from conftest import make_tiny_net
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.methods.dvlora import DVLoRA, DVLoRAConfig


def test_identity_init_forward_and_merge() -> None:
    lin = nn.Linear(10, 6)
    base = BaseView(lin)
    a = DVLoRA(base, DVLoRAConfig(r=3, alpha=6.0))
    x = torch.randn(4, 10)
    assert torch.equal(a(x, lin(x), base), lin(x))
    assert a.U.abs().max() <= 1 and a.V.abs().max() <= 1
    with torch.no_grad():
        a.B.normal_()
    want = lin(x) + 2.0 * x @ (a.A * a.U).T @ (a.B * a.V).T
    torch.testing.assert_close(a(x, lin(x), base), want, atol=1e-6, rtol=0)
    merged = nn.functional.linear(x, lin.weight + a.delta_weight(base), lin.bias)
    torch.testing.assert_close(merged, want, atol=1e-5, rtol=0)
    assert sum(p.numel() for p in a.parameters()) == DVLoRA.expected_trainable(base, a.config) == 3 * 16 + 3 + 6


def _grads(model: pk.AdaptedModel) -> dict[str, bool]:
    adapter = model.adapter_modules("default")["fc1"]
    for p in adapter.parameters():
        p.grad = None
    model(input_ids=torch.randint(0, 40, (2, 5))).sum().backward()
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in adapter.named_parameters()}


def test_phase_switch() -> None:
    model = pk.adapt(make_tiny_net(), DVLoRAConfig(r=2, warm_up_step=3, targets=["fc1"]))
    adapter = model.adapter_modules("default")["fc1"]
    with torch.no_grad():
        adapter.B.normal_()
    assert _grads(model) == {"A": True, "B": True, "U": False, "V": False}
    model.step_adapters(1)
    assert {n: p.requires_grad for n, p in adapter.named_parameters()} == {"A": True, "B": True, "U": False, "V": False}
    model.step_adapters(3)
    assert {n: p.requires_grad for n, p in adapter.named_parameters()} == {"A": False, "B": False, "U": True, "V": True}
    assert _grads(model) == {"A": False, "B": False, "U": True, "V": True}


def test_single_phase() -> None:
    model = pk.adapt(make_tiny_net(), DVLoRAConfig(r=2, warm_up_step=None, targets=["fc1"]))
    with torch.no_grad():
        model.adapter_modules("default")["fc1"].B.normal_()
    model.step_adapters(10**6)
    assert all(_grads(model).values())
