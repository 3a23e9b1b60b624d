"""KronA / DiffuseKronA spec properties: count, efficient forward equals the dense ``torch.kron`` form,
the official DiffuseKronA layout equals the row-permuted Kronecker product (explicit index formula),
``rank(ΔW) = rank(A)·rank(B)``, identity at init, merged == unmerged, divisibility checked."""

from __future__ import annotations

import pytest
import torch
from _structured_parity import seeded_linear
from conftest import make_tiny_net
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.errors import InvalidConfigError
from peftkit.methods.krona import DiffuseKronA, DiffuseKronAConfig, KronA, KronAConfig


def _base() -> tuple[BaseView, nn.Linear]:
    return seeded_linear()


def _randomise(adapter: nn.Module) -> None:
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()


@pytest.mark.parametrize(
    "cls,cfg", [(KronA, KronAConfig(a1=4, a2=6, scale=0.5)), (DiffuseKronA, DiffuseKronAConfig(a1=4, a2=6))]
)
def test_count_efficient_forward_equals_dense(cls: type, cfg: KronAConfig) -> None:
    base, lin = _base()
    a = cls(base, cfg)
    assert sum(p.numel() for p in a.parameters()) == 4 * 6 + 5 * 4 == cls.expected_trainable(base, cfg)
    _randomise(a)
    x = torch.randn(2, 3, 24)
    with torch.no_grad():
        dense = lin(x) + x @ a.delta_weight(base).T
        torch.testing.assert_close(a(x, lin(x), base), dense, atol=1e-5, rtol=0)


def test_krona_delta_is_kron_and_rank_multiplies() -> None:
    base, _ = _base()
    a = KronA(base, KronAConfig(a1=4, a2=6))
    with torch.no_grad():
        a.A.copy_(torch.randn(4, 2) @ torch.randn(2, 6))  # rank 2
        a.B.copy_(torch.randn(5, 3) @ torch.randn(3, 4))  # rank 3
    dw = a.delta_weight(base).detach()
    torch.testing.assert_close(dw, torch.kron(a.A, a.B).detach())
    assert torch.linalg.matrix_rank(dw, rtol=1e-5) == 6


def test_diffusekrona_faithful_layout() -> None:
    base, _ = _base()
    a = DiffuseKronA(base, DiffuseKronAConfig(a1=4, a2=6))
    _randomise(a)
    d, u = a.down.detach(), a.up.detach()  # [a2, a1], [b1, b2]
    want = torch.empty(20, 24)
    for uu in range(5):
        for v in range(4):
            for p in range(6):
                for q in range(4):
                    want[uu * 4 + v, p * 4 + q] = u[uu, q] * d[p, v]
    torch.testing.assert_close(a.delta_weight(base).detach(), want)
    perm = torch.arange(20).reshape(5, 4).T.reshape(-1)  # canonical row v·b1+u -> faithful row u·a1+v
    torch.testing.assert_close(a.delta_weight(base).detach()[perm], torch.kron(d.T.contiguous(), u))


@pytest.mark.parametrize("cls,cfg", [(KronA, KronAConfig()), (DiffuseKronA, DiffuseKronAConfig(a1=4, a2=4, seed=1))])
def test_identity_at_init_and_merge(cls: type, cfg: KronAConfig) -> None:
    model = pk.adapt(make_tiny_net(), cfg.replace(targets=["fc1", "fc2"]), name="a")
    x = torch.randint(0, 40, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(x), make_tiny_net()(x), atol=1e-6, rtol=0)
        for a in model.adapter_modules("a").values():
            _randomise(a)
        want = model(x)
        merged = model.merge(unload=True)
        torch.testing.assert_close(merged(x), want, atol=1e-5, rtol=0)


def test_seeded_init_and_divisibility() -> None:
    base, _ = _base()
    one = DiffuseKronA(base, DiffuseKronAConfig(a1=4, a2=6, seed=3))
    two = DiffuseKronA(base, DiffuseKronAConfig(a1=4, a2=6, seed=3))
    assert torch.equal(one.down, two.down)
    assert KronA(base, KronAConfig()).sizes == (4, 4, 5, 6)  # near-square factors of 20 and 24
    with pytest.raises(InvalidConfigError, match="must divide"):
        KronA(base, KronAConfig(a1=3))
    with pytest.raises(InvalidConfigError, match="a2"):
        KronAConfig(a2=0)
