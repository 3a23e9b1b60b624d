"""QWHA spec properties: ``H Hᵀ = d_in I``, ``iwht(wht(X)) == X``, ΔW equals the dense formula and the fast
forward equals it, zero init is identity, count ``r(d_in + d_out)``, quantization-aware init with every
frequency reproduces E exactly (``Ŵ + ΔW == W``), per-channel counts sum to n, the fitted init reduces the
error, merged == unmerged, power-of-two d_in required."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_net
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.errors import InvalidConfigError
from peftkit.methods.qwha import QWHA, QWHAConfig, ada_alloc, fwht, hadamard


def _adapter(d_in: int = 16, d_out: int = 12, **kw: object) -> tuple[QWHA, BaseView, nn.Linear]:
    torch.manual_seed(0)
    lin = nn.Linear(d_in, d_out)
    base = BaseView(lin)
    return QWHA(base, QWHAConfig(**kw)), base, lin


@pytest.mark.parametrize("d", [1, 2, 8, 64])
def test_hadamard_orthogonal_and_inverse(d: int) -> None:
    h = hadamard(d)
    torch.testing.assert_close(h @ h.T, d * torch.eye(d, dtype=h.dtype))
    x = torch.randn(3, d, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ h)
    torch.testing.assert_close(fwht(fwht(x)) / d, x)  # iwht(wht(X)) = X Hᵀ H / d


def test_count_delta_formula_forward_and_identity() -> None:
    a, base, lin = _adapter(r=1, scaling=7.0)
    assert a.spectrum.numel() == 28 == QWHA.expected_trainable(base, a.config)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        torch.testing.assert_close(a(x, lin(x), base), lin(x), atol=0, rtol=0)
        a.spectrum.normal_()
        s = torch.zeros(12, 16, dtype=torch.float64)
        s[a.indices[0], a.indices[1]] = a.spectrum.double()
        want = s @ hadamard(16).T * 7.0 / (16 * math.sqrt(12))
        torch.testing.assert_close(a.delta_weight(base).double(), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(a(x, lin(x), base), lin(x) + x @ a.delta_weight(base).T, atol=1e-5, rtol=0)


def test_quant_init_all_frequencies_is_exact() -> None:
    a, base, lin = _adapter(n_frequency=12 * 16, init="qwha", scaling=100.0)
    w_full = lin.weight.detach() + 0.05 * torch.randn(12, 16)  # W; the base holds Ŵ
    counts = a.quant_init(torch.randn(64, 16), w_full - lin.weight.detach())
    assert counts.tolist() == [16] * 12
    torch.testing.assert_close(lin.weight.detach() + a.delta_weight(base).detach(), w_full, atol=1e-5, rtol=0)
    assert "indices" in a.state_dict()  # data-dependent indices are saved


def test_quant_init_budget_and_error_reduction() -> None:
    a, base, _ = _adapter(r=2, init="qwha", scaling=100.0)
    torch.manual_seed(1)
    err = 0.05 * torch.randn(12, 16)
    x = torch.randn(128, 16)
    counts = a.quant_init(x, err)
    assert int(counts.sum()) == a.spectrum.numel() == 56 and counts.max() <= 16
    assert (a.indices[0] * 16 + a.indices[1]).unique().numel() == 56
    residual = err - a.delta_weight(base).detach()
    assert (x @ residual.T).norm() < 0.8 * (x @ err.T).norm()


def test_ada_alloc_rules() -> None:
    k = ada_alloc(torch.tensor([100.0, 1.0, 1.0, 1.0]), 20, cap=8)
    assert k.sum() == 20 and k[0] == 8 and k.max() <= 8
    assert ada_alloc(torch.tensor([1.0, 1.0, 1.0]), 4, cap=5).tolist() in ([2, 1, 1], [1, 2, 1], [1, 1, 2])


def test_merge_and_validation() -> None:
    model = pk.adapt(make_tiny_net(), QWHAConfig(r=1, scaling=10.0, targets=["fc1", "fc2"]), name="a")
    ids = torch.randint(0, 40, (3, 5))
    with torch.no_grad():
        for layer in model.adapter_modules("a").values():
            layer.spectrum.normal_()
        want = model(ids)
        torch.testing.assert_close(model.merge(unload=True)(ids), want, atol=1e-5, rtol=0)
    with pytest.raises(InvalidConfigError, match="power-of-two"):
        _adapter(d_in=24)
    with pytest.raises(InvalidConfigError, match="larger than"):
        _adapter(n_frequency=12 * 16 + 1)


def test_initial_indices_are_fourierfts_recipe() -> None:
    """``randperm(d_out·d_in)[:n]`` of a generator seeded by ``random_loc_seed``, as rows ``idx // d_in`` and
    columns ``idx % d_in`` (FourierFT's locations); saved only with ``init="qwha"``."""
    for init, saved in (("zero", False), ("qwha", True)):
        a, _, _ = _adapter(n_frequency=40, random_loc_seed=3, init=init)
        idx = torch.randperm(12 * 16, generator=torch.Generator().manual_seed(3))[:40]
        assert torch.equal(a.indices, torch.stack([idx // 16, idx % 16]))
        assert ("indices" in a.state_dict()) == saved
