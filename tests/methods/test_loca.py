"""LoCA spec properties: orthonormal DCT, ΔW = α·idctn(S, ortho) (against the dense matrix form), fast
transforms match the matrices, identity at init, n distinct locations always (also after location steps),
locations saved, frozen locations after ``T_loc``."""

from __future__ import annotations

import pytest
import torch
from _structured_parity import on_linear
from conftest import make_tiny_net
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.errors import InvalidConfigError
from peftkit.methods.loca import LoCA, LoCAConfig, dct, dct_matrix, idct


def _adapter(**kw: object) -> tuple[LoCA, BaseView, nn.Linear]:
    return on_linear(LoCA, LoCAConfig(**kw))


@pytest.mark.parametrize("n", [1, 2, 7, 16, 20])
def test_dct_orthonormal_and_fast_transforms(n: int) -> None:
    c = dct_matrix(n)
    assert (c @ c.T - torch.eye(n, dtype=c.dtype)).abs().max() < 1e-5
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(dct(x), x @ c.T)
    torch.testing.assert_close(idct(x), x @ c)
    torch.testing.assert_close(idct(dct(x)), x)


def test_count_and_delta_is_alpha_idct2() -> None:
    a, base, _ = _adapter(n_frequency=50, alpha=3.0, init="randn")
    assert a.coefficients.numel() == 50 == LoCA.expected_trainable(base, a.config)
    s = torch.zeros(20, 24, dtype=torch.float64)
    s[a.locations[0], a.locations[1]] = a.coefficients.detach().double()
    want = 3.0 * dct_matrix(20).T @ s @ dct_matrix(24)
    torch.testing.assert_close(a.delta_weight(base).double(), want, atol=1e-5, rtol=0)


def test_identity_at_init_and_randn_not() -> None:
    x = torch.randn(3, 24)
    with torch.no_grad():
        a, base, lin = _adapter(n_frequency=30)
        torch.testing.assert_close(a(x, lin(x), base), lin(x), atol=0, rtol=0)
        r, base, lin = _adapter(n_frequency=30, init="randn")
        assert not torch.allclose(r(x, lin(x), base), lin(x))


def test_locations_seeded_distinct_and_bad_fields() -> None:
    a, _, _ = _adapter(n_frequency=100, seed=5)
    b, _, _ = _adapter(n_frequency=100, seed=5)
    c, _, _ = _adapter(n_frequency=100, seed=6)
    assert torch.equal(a.locations, b.locations) and not torch.equal(a.locations, c.locations)
    assert (a.locations[0] * 24 + a.locations[1]).unique().numel() == 100
    with pytest.raises(InvalidConfigError, match="larger than"):
        _adapter(n_frequency=24 * 20 + 1)
    with pytest.raises(InvalidConfigError, match="loc_fraction"):
        LoCAConfig(loc_fraction=2.0)


def test_location_learning_moves_distinct_then_freezes() -> None:
    a, base, lin = _adapter(n_frequency=60, init="randn", total_steps=10, coef_steps=1, loc_steps=1, loc_lr=50.0)
    a.train()
    x, target = torch.randn(16, 24), torch.randn(16, 20)
    start = a.locations.clone()
    for step in range(1, 11):
        loss = (a(x, lin(x).detach(), base) - target).pow(2).mean()
        loss.backward()
        a.coefficients.grad = None
        before = a.locations.clone()
        a.step(step)
        assert (a.locations[0] * 24 + a.locations[1]).unique().numel() == 60
        if step > 3:  # T_loc = 0.3 · 10 steps: frozen afterwards
            assert torch.equal(a.locations, before)
    assert not torch.equal(a.locations, start)
    # the finite-difference gradient points downhill: moving along it decreases the loss to first order
    assert a.locations.min() >= 0 and a.locations[0].max() < 20 and a.locations[1].max() < 24


def test_frozen_locations_gradient_only_on_coefficients() -> None:
    a, base, lin = _adapter(n_frequency=10, init="randn")
    x = torch.randn(4, 24)
    a(x, lin(x), base).sum().backward()
    grads = {n for n, p in a.named_parameters() if p.grad is not None}
    assert grads == {"coefficients"} and a.locations.dtype == torch.long


def test_learned_locations_saved(tmp_path) -> None:
    model = pk.adapt(make_tiny_net(), LoCAConfig(n_frequency=20, init="randn", targets=["fc1"]), name="a")
    layer = next(iter(model.adapter_modules("a").values()))
    with torch.no_grad():
        layer.locations[1, 0] = (layer.locations[1, 0] + 1) % 16
        if (layer.locations[0] * 16 + layer.locations[1]).unique().numel() < 20:
            layer.locations[1, 0] = (layer.locations[1, 0] - 1) % 16
    x = torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        want = model(x)
    model.save(tmp_path / "l")
    loaded = pk.load(make_tiny_net(), tmp_path / "l")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, atol=0, rtol=0)


def test_initial_locations_are_fourierfts_recipe() -> None:
    """``randperm(d_out·d_in)[:n]`` of a generator seeded by the config's seed (777 when unset), as rows
    ``idx // d_in`` and columns ``idx % d_in``: the FourierFT / PEFT recipe."""
    for seed, used in ((5, 5), (None, 777)):
        a, base, _ = _adapter(n_frequency=50, seed=seed)
        d_out, d_in = base.out_features, base.in_features
        idx = torch.randperm(d_out * d_in, generator=torch.Generator().manual_seed(used))[:50]
        assert torch.equal(a.locations, torch.stack([idx // d_in, idx % d_in]))
