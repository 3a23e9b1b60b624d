"""Block-LoRA spec properties: sum-then-project forward equals the tiled ΔW, count, n | in, identity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.methods.blocklora import BlockLoRA, BlockLoRAConfig


def test_forward_equals_tiled_delta_and_count() -> None:
    lin = nn.Linear(12, 5)
    base = BaseView(lin)
    cfg = BlockLoRAConfig(r=2, alpha=4.0, n=3, dropout=0.0)
    a = BlockLoRA(base, cfg)
    x = torch.randn(2, 4, 12)
    assert torch.equal(a(x, lin(x), base), lin(x))  # identity at init
    with torch.no_grad():
        a.B.normal_()
    tiled = torch.cat([a.A_s] * 3, dim=1)
    torch.testing.assert_close(a.delta_weight(base), 2.0 * a.B @ tiled)
    want = lin(x) + 2.0 * (x[..., :4] + x[..., 4:8] + x[..., 8:]) @ a.A_s.T @ a.B.T
    torch.testing.assert_close(a(x, lin(x), base), want, atol=1e-6, rtol=0)
    merged = nn.functional.linear(x, lin.weight + a.delta_weight(base), lin.bias)
    torch.testing.assert_close(merged, want, atol=1e-5, rtol=0)
    assert sum(p.numel() for p in a.parameters()) == BlockLoRA.expected_trainable(base, cfg) == 2 * 4 + 5 * 2


def test_n_must_divide_input_width() -> None:
    with pytest.raises(pk.errors.UnsupportedLayerError):
        BlockLoRA(BaseView(nn.Linear(10, 5)), BlockLoRAConfig(n=4))
    with pytest.raises(pk.errors.InvalidConfigError):
        BlockLoRAConfig(n=0)


def test_defaults_from_spec() -> None:
    c = BlockLoRAConfig()
    assert (c.n, c.r, c.alpha, c.dropout) == (8, 2, 1.0, 0.25)
