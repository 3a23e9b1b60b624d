"""WaRA spec properties: count, closed form equals the explicit Haar DWT2 → shared adapter → IDWT2 path
(1e-5), Haar round trip, ``rank(ΔW) = 2·rank(BA)``, low-rank form equals ΔW, identity at init, merged ==
unmerged, even sizes required."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_net
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.errors import InvalidConfigError
from peftkit.methods.wara import WaRA, WaRAConfig, haar, ihaar


def _adapter(**kw: object) -> tuple[WaRA, BaseView, nn.Linear]:
    torch.manual_seed(0)
    lin = nn.Linear(24, 20)
    base = BaseView(lin)
    a = WaRA(base, WaRAConfig(**kw))
    with torch.no_grad():
        a.B.normal_()
    return a, base, lin


def test_count_and_haar_round_trip() -> None:
    a, base, _ = _adapter(r=3)
    assert sum(p.numel() for p in a.parameters()) == 3 * (24 + 20) // 2 == WaRA.expected_trainable(base, a.config)
    x = torch.randn(4, 6, 10)
    lo, hi = haar(x, -2)
    torch.testing.assert_close(ihaar(lo, hi, -2), x)
    torch.testing.assert_close(lo.pow(2).sum() + hi.pow(2).sum(), x.pow(2).sum())  # orthonormal


def test_closed_form_equals_explicit_transform() -> None:
    a, base, lin = _adapter(r=4, alpha=2.0)
    x = torch.randn(3, 8, 24)
    with torch.no_grad():
        closed = a(x, lin(x), base)
        a.config.explicit = True
        explicit = a(x, lin(x), base)
        torch.testing.assert_close(explicit, closed, atol=1e-5, rtol=0)
        torch.testing.assert_close(closed, lin(x) + x @ a.delta_weight(base).T, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="even token count"):
            a(x[:, :7], lin(x[:, :7]), base)


def test_delta_structure_rank_and_lowrank() -> None:
    a, base, _ = _adapter(r=3, alpha=6.0)
    dw = a.delta_weight(base).detach()
    m = (a.B @ a.A).detach() * 2.0
    torch.testing.assert_close(dw[0::2, 0::2], m)
    torch.testing.assert_close(dw[1::2, 1::2], m)
    assert dw[0::2, 1::2].abs().max() == 0 and dw[1::2, 0::2].abs().max() == 0
    assert torch.linalg.matrix_rank(dw) == 2 * torch.linalg.matrix_rank(m) == 6
    lr = a.lowrank(base)
    torch.testing.assert_close(lr.scale * lr.up @ lr.down, dw.detach(), atol=1e-6, rtol=0)


def test_identity_at_init_merge_and_even_sizes() -> None:
    model = pk.adapt(make_tiny_net(), WaRAConfig(r=2, targets=["fc1", "fc2"]), name="a")
    x = torch.randint(0, 40, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(x), make_tiny_net()(x), atol=0, rtol=0)
        for a in model.adapter_modules("a").values():
            a.B.normal_()
        want = model(x)
        torch.testing.assert_close(model.merge(unload=True)(x), want, atol=1e-5, rtol=0)
    with pytest.raises(InvalidConfigError, match="even"):
        WaRA(BaseView(nn.Linear(5, 4)), WaRAConfig())
    with pytest.raises(InvalidConfigError, match="r must"):
        WaRAConfig(r=0)
