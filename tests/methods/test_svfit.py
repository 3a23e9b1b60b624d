"""SVFit spec properties (shared/methods/init.md): r trainable singular values per layer, frozen U_r and V_r,
ΔW in span(U_r) ⊗ span(V_r), identity at init, exact merge, deterministic signs, untouched base on
save/load, a toy regression that trains."""

from __future__ import annotations

import pytest
import torch
from _svd_family import check_roundtrip_on_fresh_base, toy_regression_losses
from conftest import make_tiny_net
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.methods.svfit import SVFit, SVFitConfig, energy_rank


def _adapter(r: int = 3, out: int = 12, inp: int = 8) -> tuple[SVFit, BaseView, nn.Linear]:
    torch.manual_seed(0)
    lin = nn.Linear(inp, out)
    base = BaseView(lin)
    return SVFit(base, SVFitConfig(r=r)), base, lin


def test_trainable_count_is_r_and_factors_frozen() -> None:
    model = pk.adapt(make_tiny_net(), SVFitConfig(r=3, targets=["fc1", "fc2"]))
    assert model.trainable_parameters().trainable == 2 * 3
    for adapter in model.adapter_modules("default").values():
        assert [n for n, _ in adapter.named_parameters()] == ["sigma"]
        assert set(adapter.state_dict()) == {"U", "Vh", "sigma0", "sigma"}


def test_factors_are_the_top_singular_triplets() -> None:
    a, _, lin = _adapter(r=3)
    u, s, vh = torch.linalg.svd(lin.weight.double(), full_matrices=False)
    torch.testing.assert_close(a.sigma0, s[:3].float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(a.sigma.detach(), a.sigma0, atol=0, rtol=0)
    torch.testing.assert_close(a.U.T @ a.U, torch.eye(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(a.Vh @ a.Vh.T, torch.eye(3), atol=1e-6, rtol=0)
    # the same subspaces as LAPACK's (up to the sign of each pair), and each pair reproduces σ_i u_i v_iᵀ
    torch.testing.assert_close((a.U.T.double() @ u[:, :3]).abs(), torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    for i in range(3):
        torch.testing.assert_close(
            torch.outer(a.U[:, i], a.Vh[i]).double(), torch.outer(u[:, i], vh[i]), atol=1e-6, rtol=0
        )


def test_sign_convention_and_determinism() -> None:
    a, _, _ = _adapter(r=3)
    cols = torch.arange(3)
    assert (a.U[a.U.abs().argmax(dim=0), cols] > 0).all(), "largest-|entry| of each left vector must be positive"
    b, _, _ = _adapter(r=3)
    assert torch.equal(a.U, b.U) and torch.equal(a.Vh, b.Vh) and torch.equal(a.sigma0, b.sigma0)


def test_identity_at_init_is_exact() -> None:
    a, base, lin = _adapter(r=3)
    x = torch.randn(5, 8)
    assert torch.equal(a(x, lin(x), base), lin(x))
    assert torch.equal(a.delta_weight(base), torch.zeros(12, 8))


def test_delta_lies_in_span_of_top_singular_vectors() -> None:
    a, base, _ = _adapter(r=3)
    with torch.no_grad():
        a.sigma.add_(torch.randn(3))
    delta = a.delta_weight(base)
    assert delta.norm() > 1e-2
    left = torch.eye(12) - a.U @ a.U.T  # projector onto span(U_r)^⊥
    right = torch.eye(8) - a.Vh.T @ a.Vh  # projector onto span(V_r)^⊥
    assert (left @ delta).abs().max() < 1e-5
    assert (delta @ right).abs().max() < 1e-5
    # and it is exactly U_r diag(σ − σ₀) V_rᵀ
    want = a.U @ torch.diag(a.sigma - a.sigma0) @ a.Vh
    torch.testing.assert_close(delta, want, atol=1e-6, rtol=0)


def test_forward_equals_paper_residual_form_and_merge() -> None:
    """``x W_eᵀ + b + x V_r diag(σ) U_rᵀ`` with ``W_e = W − U_r diag(σ₀) V_rᵀ`` (the paper) equals our offset form."""
    a, base, lin = _adapter(r=3)
    with torch.no_grad():
        a.sigma.mul_(1.5)
    x = torch.randn(5, 8)
    residual = lin.weight - a.U @ torch.diag(a.sigma0) @ a.Vh
    paper = x @ residual.T + lin.bias + x @ a.Vh.T @ torch.diag(a.sigma) @ a.U.T
    ours = a(x, lin(x), base)
    torch.testing.assert_close(ours, paper, atol=1e-5, rtol=0)
    merged = nn.functional.linear(x, lin.weight + a.delta_weight(base), lin.bias)
    torch.testing.assert_close(merged, ours, atol=1e-5, rtol=0)
    low = a.lowrank(base)
    torch.testing.assert_close(low.scale * low.up @ low.down, a.delta_weight(base), atol=1e-6, rtol=0)


def test_grads_reach_sigma_only() -> None:
    model = pk.adapt(make_tiny_net(), SVFitConfig(r=2, targets=["fc1"]))
    model(input_ids=torch.randint(0, 40, (2, 5))).sum().backward()
    adapter = model.adapter_modules("default")["fc1"]
    assert adapter.sigma.grad is not None and adapter.sigma.grad.abs().sum() > 0
    assert not any(t.requires_grad for t in (adapter.U, adapter.Vh, adapter.sigma0))


def test_toy_regression_trains() -> None:
    losses = toy_regression_losses(SVFitConfig(r=4))
    assert losses[-1] < 0.5 * losses[0], losses


def test_save_load_onto_fresh_base(tmp_path) -> None:
    loaded = check_roundtrip_on_fresh_base(SVFitConfig(r=3), tmp_path, ["fc1", "fc2"])
    adapter = loaded.adapter_modules("default")["fc1"]
    assert not torch.equal(adapter.sigma.detach(), adapter.sigma0), "training moved σ"


def _spectrum_net() -> nn.Sequential:
    """Two 8x8 layers with known spectra: a steep one (3, 2, 1, 0.5, 0.1, ...) and a flat one (all 1)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    q1, _ = torch.linalg.qr(torch.randn(8, 8))
    q2, _ = torch.linalg.qr(torch.randn(8, 8))
    steep = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1, 0.1, 0.1, 0.1])
    with torch.no_grad():
        net[0].weight.copy_(q1 @ torch.diag(steep) @ q2.T)
        net[1].weight.copy_(q2)
    return net


def test_energy_chooses_smallest_rank_per_layer() -> None:
    assert energy_rank(torch.tensor([3.0, 2.0, 1.0, 0.5]), 0.9) == 2  # 9/14.25 = 0.63 < 0.9 <= 13/14.25
    assert energy_rank(torch.tensor([3.0, 2.0, 1.0, 0.5]), 0.6) == 1
    assert energy_rank(torch.tensor([3.0, 2.0, 1.0, 0.5]), 1.0) == 4
    assert energy_rank(torch.zeros(4), 0.99) == 1  # a zero layer: nothing to keep
    model = pk.adapt(_spectrum_net(), SVFitConfig(energy=0.9, targets=["0", "1"]))
    ranks = {path: a.sigma.shape[0] for path, a in model.adapter_modules("default").items()}
    assert ranks == {"0": 2, "1": 8}  # steep: 13 of 13.29; flat: 8 of 8 (7/8 < 0.9)
    assert model.trainable_parameters().trainable == 2 + 8
    adapter = model.adapter_modules("default")["0"]
    assert adapter.U.shape == (8, 2) and adapter.Vh.shape == (2, 8) and adapter.effective_rank() == 2
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(model(x), _spectrum_net()(x))


def test_energy_ranks_reload_from_the_file(tmp_path) -> None:
    model = pk.adapt(_spectrum_net(), SVFitConfig(energy=0.9, targets=["0", "1"]))
    with torch.no_grad():
        for adapter in model.adapter_modules("default").values():
            adapter.sigma.mul_(1.3)
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = model(x)
    model.save(tmp_path / "ad")
    loaded = pk.load(_spectrum_net(), tmp_path / "ad")
    assert {p: a.sigma.shape[0] for p, a in loaded.adapter_modules("default").items()} == {"0": 2, "1": 8}
    with torch.no_grad():
        assert torch.equal(loaded(x), want)
    loaded.load_adapter(tmp_path / "ad", name="other", activate=False)  # reallocated tensors stay frozen
    assert not any(p.requires_grad for a in loaded.adapter_modules("other").values() for p in a.parameters())
    assert all(p.requires_grad for a in loaded.adapter_modules("default").values() for p in a.parameters())


def test_bad_config() -> None:
    with pytest.raises(pk.errors.InvalidConfigError, match=r"energy must .*got 1\.5"):
        SVFitConfig(energy=1.5)
    with pytest.raises(pk.errors.InvalidConfigError, match=r"r must lie in \[1, inf\), got 0"):
        SVFitConfig(r=0)
    with pytest.raises(pk.errors.InvalidConfigError, match="r=9 is larger"):
        _adapter(r=9)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_energy_is_a_positive_fraction(bad: float) -> None:
    """``energy`` lies in (0, 1] (``None``: fixed r); a wrong value names the bound."""
    assert SVFitConfig(energy=1.0).energy == 1.0 and SVFitConfig().energy is None
    with pytest.raises(pk.errors.InvalidConfigError, match=r"energy must lie in \(0, 1\], got"):
        SVFitConfig(energy=bad)
