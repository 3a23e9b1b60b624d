"""Hydra spec properties: identity at init, exact merge including the bias, grads only on branch params."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_net
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.methods.hydra import Hydra, HydraConfig


def _randomised(lin: nn.Linear, **kw) -> Hydra:
    a = Hydra(BaseView(lin), HydraConfig(r=3, **kw))
    with torch.no_grad():
        for p in a.parameters():
            p.normal_(std=0.3)
    return a


def test_identity_at_init_and_count() -> None:
    lin = nn.Linear(10, 6)
    base = BaseView(lin)
    a = Hydra(base, HydraConfig(r=3))
    x = torch.randn(4, 10)
    assert torch.equal(a(x, lin(x), base), lin(x))
    assert a.D_p.std().item() == pytest.approx(0.02, rel=0.3)
    n = sum(p.numel() for p in a.parameters())
    assert n == Hydra.expected_trainable(base, HydraConfig(r=3)) == 3 * 16 + 3 + 6 + 3 * 12 + 3 + 6


def test_forward_is_parallel_plus_sequential() -> None:
    lin = nn.Linear(10, 6)
    base = BaseView(lin)
    a = _randomised(lin, learnable_scale=True)
    x = torch.randn(4, 10)
    h = lin(x)
    par = (x @ a.D_p.T + a.d_p) @ a.U_p.T + a.u_p
    seq = (h @ a.D_s.T + a.d_s) @ a.U_s.T + a.u_s
    torch.testing.assert_close(a(x, h, base), h + a.sigma * (par + seq))


def test_merge_exact_including_bias() -> None:
    lin = nn.Linear(10, 6)
    base = BaseView(lin)
    a = _randomised(lin)
    x = torch.randn(4, 10)
    want = a(x, lin(x), base)
    merged = nn.functional.linear(x, lin.weight + a.delta_weight(base), lin.bias + a.delta_bias(base))
    torch.testing.assert_close(merged, want, atol=1e-5, rtol=0)
    assert a.lowrank(base) is None


def test_merge_in_model_and_unmerge() -> None:
    net = make_tiny_net()
    fc1 = net.fc1
    model = pk.adapt(net, HydraConfig(r=2, targets=["fc1", "fc2"], learnable_scale=True)).eval()
    with torch.no_grad():
        for m in model.adapter_modules("default").values():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    ids = torch.randint(0, 40, (3, 5))
    bias_before = fc1.bias.clone()
    with torch.no_grad():
        want = model(input_ids=ids)
        model.merge(unload=False)
        assert not torch.equal(fc1.bias, bias_before)
        torch.testing.assert_close(model(input_ids=ids), want, atol=1e-5, rtol=0)
        model.unmerge()
    torch.testing.assert_close(fc1.bias, bias_before, atol=1e-6, rtol=0)


def test_bias_less_base_cannot_merge() -> None:
    lin = nn.Sequential(nn.Linear(8, 8, bias=False))
    model = pk.adapt(lin, HydraConfig(targets=["0"]))
    with pytest.raises(pk.errors.NotMergeableError):
        model.merge()


def test_grads_only_on_branch_params() -> None:
    net = make_tiny_net()
    model = pk.adapt(net, HydraConfig(r=2, targets=["fc1"], learnable_scale=True))
    adapter = model.adapter_modules("default")["fc1"]
    with torch.no_grad():
        adapter.U_p.normal_()
        adapter.U_s.normal_()
    model(input_ids=torch.randint(0, 40, (2, 5))).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert all(p.grad is None for p in net.parameters() if not any(p is q for q in adapter.parameters()))
