"""VLSM-Adapter spec properties: ``o + ReLU(fc2(ReLU(fc1 o)))`` (trailing ReLU kept), parameter count
``2rd + r + d`` per adapter, torch default init (not identity), frozen base gets no gradient."""

from __future__ import annotations

import math

import torch
from conftest import tiny_bert
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.methods.bottleneck import bottleneck_targets
from peftkit.methods.vlsm import VLSMAdapter, VLSMConfig


def test_forward_keeps_the_trailing_relu() -> None:
    lin = nn.Linear(6, 8)
    adapter = VLSMAdapter(BaseView(lin), VLSMConfig(r=3))
    x = torch.randn(2, 5, 6)
    o = lin(x)
    fc1, fc2 = adapter.branch.down, adapter.branch.up
    want = o + torch.relu(fc2(torch.relu(fc1(o))))
    torch.testing.assert_close(adapter(x, o, BaseView(lin)), want, rtol=0, atol=0)
    assert (adapter(x, o, BaseView(lin)) - o).min() >= 0  # the delta is a ReLU output


def test_torch_default_init_not_identity() -> None:
    torch.manual_seed(0)
    adapter = VLSMAdapter(BaseView(nn.Linear(16, 16)), VLSMConfig(r=8))
    for lin in (adapter.branch.down, adapter.branch.up):
        bound = 1 / math.sqrt(lin.in_features)
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > bound / 2
        assert lin.bias.abs().max() <= bound and lin.bias.abs().max() > 0


def test_dense_placement_param_count_and_frozen_grads() -> None:
    base = tiny_bert()
    targets = bottleneck_targets(base, "houlsby")
    assert len(targets) == 4  # 2 layers x (attention output, FFN output)
    model = pk.adapt(base, VLSMConfig(r=5))
    d = 32
    assert model.trainable_parameters().trainable == len(targets) * (2 * 5 * d + 5 + d)
    out = model(input_ids=torch.randint(0, 64, (2, 6))).last_hidden_state
    out.square().mean().backward()
    assert all(p.grad is None for p in model.get_base_model().parameters() if not p.requires_grad)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
