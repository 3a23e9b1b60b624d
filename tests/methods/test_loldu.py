"""LoLDU spec properties (shared/methods/init.md): P L diag(D) U_unit == W, r trainable (z only; c frozen by
default, trainable on request), identity at init, zero pivots handled, the official residual form, P as an
index vector, Conv2d / Embedding, untouched base on save/load, a toy regression that trains."""

from __future__ import annotations

import pytest
import torch
from _svd_family import check_roundtrip_on_fresh_base, toy_regression_losses
from conftest import make_tiny_net
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.methods.loldu import LoLDU, LoLDUConfig, ldu


def _adapter(out: int = 12, inp: int = 8, **kw) -> tuple[LoLDU, BaseView, nn.Linear]:
    torch.manual_seed(0)
    lin = nn.Linear(inp, out)
    base = BaseView(lin)
    return LoLDU(base, LoLDUConfig(**kw)), base, lin


@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (10, 10)])
def test_ldu_reconstructs_w(shape: tuple[int, int]) -> None:
    w = torch.randn(*shape)
    perm, lower, pivots, upper_unit = ldu(w)
    q = min(shape)
    assert lower.shape == (shape[0], q) and upper_unit.shape == (q, shape[1])
    torch.testing.assert_close(upper_unit.diagonal(), torch.ones(q), atol=1e-6, rtol=0)
    assert torch.equal(lower.triu(1), torch.zeros_like(lower)) and torch.equal(
        upper_unit.tril(-1), torch.zeros_like(upper_unit)
    )
    torch.testing.assert_close((lower @ torch.diag(pivots) @ upper_unit)[perm], w, atol=1e-4, rtol=0)
    # the index vector is the permutation matrix of torch.linalg.lu
    p, _, _ = torch.linalg.lu(w)
    assert torch.equal(p[torch.arange(shape[0]), perm], torch.ones(shape[0]))


def test_zero_pivots_are_clamped_and_keep_reconstruction() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 8)
    w[:, 0] = 0.0  # the first pivot is exactly 0
    w[:, 3] = -w[:, 2]  # a rank deficiency further down
    _, _, raw_u = torch.linalg.lu(w)
    assert (raw_u.diagonal().abs() < 1e-6).sum() >= 1
    perm, lower, pivots, upper_unit = ldu(w)
    assert torch.isfinite(upper_unit).all() and torch.isfinite(lower).all()
    assert (pivots.abs() >= 1e-8).all()
    assert pivots[0] == 1e-8  # an exact zero becomes +eps
    torch.testing.assert_close((lower @ torch.diag(pivots) @ upper_unit)[perm], w, atol=1e-4, rtol=0)
    negative = torch.tensor([[-1e-12, 1.0], [0.0, 1.0]])  # a tiny negative pivot keeps its sign
    assert ldu(negative)[2][0] == -1e-8


def test_zero_pivot_layer_is_identity_at_init_and_trains() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    with torch.no_grad():
        lin.weight[:, 0] = 0.0
    base = BaseView(lin)
    a = LoLDU(base, LoLDUConfig(r=4, alpha=4.0))
    x = torch.randn(5, 8)
    assert torch.equal(a(x, lin(x), base), lin(x))
    a(x, lin(x), base).sum().backward()
    assert torch.isfinite(a.z.grad).all()


def test_trainable_count_is_r_only_z_has_grad() -> None:
    model = pk.adapt(make_tiny_net(), LoLDUConfig(r=3, targets=["fc1", "fc2", "conv", "emb"]))
    assert model.trainable_parameters().trainable == 4 * 3
    model(input_ids=torch.randint(0, 40, (2, 5))).sum().backward()
    for adapter in model.adapter_modules("default").values():
        assert [n for n, _ in adapter.named_parameters()] == ["z"]
        assert set(adapter.state_dict()) == {"perm", "L", "U", "D", "z"}
        assert adapter.z.grad is not None and adapter.z.grad.abs().sum() > 0
        assert isinstance(adapter.c, float) and adapter.c == 1.0 / 3  # alpha / r, frozen
    assert all(p.grad is None for p in model.get_base_model().parameters() if not p.requires_grad)


def test_full_rank_default_and_trainable_scaling() -> None:
    a, _, _ = _adapter(out=12, inp=8)
    assert a.config.r is None and a.z.shape == (8,) and a.c == 1.0 / 8
    model = pk.adapt(make_tiny_net(), LoLDUConfig(r=2, alpha=3.0, train_scaling=True, targets=["fc1"]))
    adapter = model.adapter_modules("default")["fc1"]
    assert model.trainable_parameters().trainable == 2 + 1
    assert {n for n, _ in adapter.named_parameters()} == {"z", "c"}
    assert adapter.c.item() == pytest.approx(1.5)
    model(input_ids=torch.randint(0, 40, (2, 5))).sum().backward()
    assert adapter.c.grad is not None and adapter.z.grad is not None


def test_identity_at_init_and_paper_residual_form() -> None:
    a, base, lin = _adapter(r=3, alpha=2.0)
    x = torch.randn(5, 8)
    assert torch.equal(a(x, lin(x), base), lin(x))
    with torch.no_grad():
        a.z.add_(torch.randn(3))
    c = 2.0 / 3
    permuted_lower = a.L[a.perm]
    residual = lin.weight - c * permuted_lower @ torch.diag(a.D) @ a.U  # W_res (official get_residual_matrix)
    w_eff = residual + c * permuted_lower @ torch.diag(a.z) @ a.U
    paper = nn.functional.linear(x, w_eff, lin.bias)
    torch.testing.assert_close(a(x, lin(x), base), paper, atol=1e-5, rtol=0)
    torch.testing.assert_close(lin.weight + a.delta_weight(base), w_eff, atol=1e-5, rtol=0)
    low = a.lowrank(base)
    torch.testing.assert_close(low.scale * low.up @ low.down, a.delta_weight(base), atol=1e-6, rtol=0)


def test_conv2d_and_embedding_merge_exact() -> None:
    torch.manual_seed(0)
    for module, x in (
        (nn.Conv2d(4, 6, kernel_size=3, padding=1), torch.randn(2, 4, 5, 5)),
        (nn.Embedding(20, 8), torch.randint(0, 20, (3, 4))),
    ):
        base = BaseView(module)
        a = LoLDU(base, LoLDUConfig(r=3))
        perm, lower, pivots, upper_unit = ldu(base.weight)  # of the weight flattened to [out, fan_in]
        assert torch.equal(a.perm, perm) and torch.equal(a.D, pivots[:3])
        assert torch.equal(a.U.reshape(3, -1), upper_unit[:3]) and torch.equal(a.L, lower[:, :3])
        with torch.no_grad():
            a.z.mul_(2.0)
        want = base.apply(x, base.weight + a.delta_weight(base), base.bias)
        torch.testing.assert_close(a(x, module(x), base), want, atol=1e-5, rtol=0)
        assert a.lowrank(base) is None


def test_toy_regression_trains() -> None:
    losses = toy_regression_losses(LoLDUConfig())
    assert losses[-1] < 0.6 * losses[0], losses


def test_save_load_onto_fresh_base(tmp_path) -> None:
    check_roundtrip_on_fresh_base(LoLDUConfig(r=2, train_scaling=True), tmp_path, ["fc1", "conv", "emb"])


def test_bad_config() -> None:
    with pytest.raises(pk.errors.InvalidConfigError, match=r"LoLDUConfig: r must .*got 0"):
        LoLDUConfig(r=0)
    with pytest.raises(pk.errors.InvalidConfigError, match=r"eps must lie in \(0, inf\)"):
        LoLDUConfig(eps=0.0)
    with pytest.raises(pk.errors.InvalidConfigError, match="r=9 is larger"):
        _adapter(out=12, inp=8, r=9)
