"""PaCA spec properties: ``d_out·r`` trainable, distinct seeded column indices, identity at init, only the
selected columns of ``W_eff`` change, the gradient of the columns is ``s·gᵀ x[..., idx]``, exact column
overwrite on merge, and the memory claim: only the gathered activations ``x[..., idx]`` are saved for backward
(measured with ``torch.autograd.graph.saved_tensors_hooks``, against LoRA of the same parameter count and full
fine-tuning of the same layer)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _structured_parity import on_linear
from conftest import make_tiny_net
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.errors import InvalidConfigError
from peftkit.methods.paca import PaCA, PaCAConfig, column_indices


def _adapter(**kw: object) -> tuple[PaCA, BaseView, nn.Linear]:
    return on_linear(PaCA, PaCAConfig(**kw))


def test_count_and_distinct_seeded_columns() -> None:
    a, base, _ = _adapter(r=5, column_seed=3)
    assert a.columns.shape == (20, 5) and a.columns.numel() == PaCA.expected_trainable(base, a.config) == 100
    assert a.indices.dtype == torch.int64 and a.indices.unique().numel() == 5
    assert torch.equal(a.indices, torch.randperm(24, generator=torch.Generator().manual_seed(3))[:5])
    assert torch.equal(a.indices, column_indices(24, 5, 3))
    assert torch.equal(_adapter(r=5, column_seed=3)[0].indices, a.indices)
    assert not torch.equal(_adapter(r=5, column_seed=4)[0].indices, a.indices)


def test_bad_settings_raise() -> None:
    with pytest.raises(InvalidConfigError, match="more than this layer's 24 input features"):
        _adapter(r=25)
    with pytest.raises(InvalidConfigError, match=r"r must lie in \[1, inf\), got 0"):
        PaCAConfig(r=0)
    with pytest.raises(InvalidConfigError, match="alpha"):
        PaCAConfig(alpha=0)


def test_init_copies_the_columns_so_the_layer_is_unchanged() -> None:
    a, base, lin = _adapter(r=4, alpha=16.0)
    torch.testing.assert_close(a.columns * 4.0, lin.weight[:, a.indices], rtol=0, atol=1e-6)
    assert float(a.delta_weight(base).detach().abs().max()) < 1e-6
    x = torch.randn(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(a(x, lin(x), base), lin(x), rtol=0, atol=1e-6)


def test_forward_and_merge_are_the_column_overwrite() -> None:
    a, base, lin = _adapter(r=4, alpha=8.0)
    with torch.no_grad():
        a.columns.normal_()
    w_eff = lin.weight.detach().clone()
    w_eff[:, a.indices] = 2.0 * a.columns.detach()  # s = 8 / 4
    x = torch.randn(2, 3, 24)
    with torch.no_grad():
        torch.testing.assert_close(a(x, lin(x), base), F.linear(x, w_eff, lin.bias), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lin.weight + a.delta_weight(base), w_eff, atol=1e-6, rtol=0)
        low = a.lowrank(base)
        torch.testing.assert_close(low.scale * low.up @ low.down, a.delta_weight(base), atol=1e-6, rtol=0)


def test_column_gradient_is_scaled_gathered_outer_product() -> None:
    a, base, lin = _adapter(r=3, alpha=6.0)
    lin.requires_grad_(False)
    x = torch.randn(4, 5, 24)
    g = torch.randn(4, 5, 20)
    (a(x, lin(x), base) * g).sum().backward()
    expected = 2.0 * g.reshape(-1, 20).T @ x.reshape(-1, 24)[:, a.indices]  # s = 6 / 3
    torch.testing.assert_close(a.columns.grad, expected, atol=1e-5, rtol=1e-5)


def test_training_changes_only_the_selected_columns_and_reloads(tmp_path) -> None:
    model = pk.adapt(make_tiny_net(), PaCAConfig(r=4, targets=["fc1", "fc2"], column_seed=2))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randint(0, 40, (4, 5))
    model(x).pow(2).mean().backward()
    opt.step()
    assert before and all(n.endswith("columns") for n in before)
    for path, a in model.adapter_modules("default").items():
        d = a.delta_weight(model.get_submodule(f"model.{path}").base)
        others = torch.ones(d.shape[1], dtype=torch.bool)
        others[a.indices] = False
        assert torch.count_nonzero(d[:, others]) == 0 and torch.count_nonzero(d[:, a.indices]) > 0
    model.save(tmp_path / "p")
    loaded = pk.load(make_tiny_net(), tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


# ------------------------------------------------------------------------------------------------ memory
class _OneLayer(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def saved_for_backward(model: nn.Module, x: torch.Tensor) -> dict[int, tuple[tuple[int, ...], int]]:
    """``{storage: (shape, bytes)}`` of every tensor autograd saves for backward during one forward, except
    the model's own parameters and buffers (the frozen weight is saved by reference, it costs nothing)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, tuple[tuple[int, ...], int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            saved[ptr] = (tuple(t.shape), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return saved


@pytest.mark.parametrize("input_needs_grad", [False, True], ids=["first-layer", "inner-layer"])
def test_saves_only_the_selected_activations(input_needs_grad: bool) -> None:
    d, tokens, r_paca, r_lora = 256, 8 * 32, 16, 8  # equal parameter counts: d·16 == 8·(d + d)
    x = torch.randn(8, 32, d, requires_grad=input_needs_grad)
    torch.manual_seed(0)
    full = _OneLayer(d, d)  # full fine-tuning: every weight trains
    torch.manual_seed(0)
    lora = pk.adapt(_OneLayer(d, d), pk.get_config("lora", r=r_lora, targets=["proj"]))
    torch.manual_seed(0)
    paca = pk.adapt(_OneLayer(d, d), PaCAConfig(r=r_paca, targets=["proj"]))
    assert lora.trainable_parameters().trainable == paca.trainable_parameters().trainable == d * r_paca

    sizes = {name: saved_for_backward(m, x) for name, m in (("full", full), ("lora", lora), ("paca", paca))}
    nbytes = {name: sum(b for _, b in s.values()) for name, s in sizes.items()}
    fp32 = 4
    # PaCA: the gathered [tokens, r] slice, plus (only when x needs a gradient) the [out, r] column change.
    per_token = [shape for shape, _ in sizes["paca"].values() if shape[0] == tokens]
    assert per_token == [(tokens, r_paca)]
    assert nbytes["paca"] == tokens * r_paca * fp32 + (d * r_paca * fp32 if input_needs_grad else 0)
    # LoRA keeps the whole input (for ∂A) and its [tokens, r] hidden; full fine-tuning keeps the input.
    assert nbytes["lora"] == tokens * (d + r_lora) * fp32
    assert nbytes["full"] == tokens * d * fp32
    assert nbytes["paca"] < nbytes["lora"] / 4 and nbytes["paca"] < nbytes["full"] / 4


def _equal_width_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(32, 32) for _ in range(4)))


def test_each_layer_draws_its_own_columns_reproducibly(tmp_path) -> None:
    """Issue 12 item 16: one shared column seed made every layer of one width train the same columns (the
    official code draws per layer). Each layer now draws from the adapter's seeded RNG: layers differ, the same
    seed gives the same columns, and a reload takes them from the file."""
    targets = ["0", "1", "2", "3"]
    model = pk.adapt(_equal_width_net(), PaCAConfig(r=4, targets=targets, seed=3))
    idx = {p: a.indices.clone() for p, a in model.adapter_modules("default").items()}
    assert len({tuple(sorted(t.tolist())) for t in idx.values()}) == 4  # four layers, four column sets
    again = pk.adapt(_equal_width_net(), PaCAConfig(r=4, targets=targets, seed=3))
    assert all(torch.equal(a.indices, idx[p]) for p, a in again.adapter_modules("default").items())
    other = pk.adapt(_equal_width_net(), PaCAConfig(r=4, targets=targets, seed=4))
    assert any(not torch.equal(a.indices, idx[p]) for p, a in other.adapter_modules("default").items())

    with torch.no_grad():
        for a in model.adapter_modules("default").values():
            a.columns.add_(torch.randn(a.columns.shape, generator=torch.Generator().manual_seed(1)))
    model.save(tmp_path / "p")
    loaded = pk.load(_equal_width_net(), tmp_path / "p")
    assert all(torch.equal(a.indices, idx[p]) for p, a in loaded.adapter_modules("default").items())
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_an_explicit_column_seed_still_selects_its_columns() -> None:
    """``column_seed`` (opt-in): every layer draws ``randperm(d_in)[:r]`` from that seed, whatever ``seed``."""
    model = pk.adapt(_equal_width_net(), PaCAConfig(r=4, targets=["0", "1"], column_seed=7, seed=3))
    want = column_indices(32, 4, 7)
    assert all(torch.equal(a.indices, want) for a in model.adapter_modules("default").values())
    with pytest.raises(InvalidConfigError, match="column_seed"):
        PaCAConfig(column_seed=1.5)
