"""SHiRA spec properties (n = r(d_in+d_out) trainable, exact n ones, seeded masks, sparsity of the update
after training, rank above r, exact merge) and parity with PEFT's ``ShiraConfig``."""

from __future__ import annotations

import pytest
import torch
from _structured_parity import assert_grad_parity, assert_parity, fill, peft_model
from conftest import make_tiny_net, tiny_bert
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.errors import InvalidConfigError
from peftkit.methods.shira import SHiRA, SHiRAConfig, random_mask


def _adapter(**kw: object) -> tuple[SHiRA, BaseView, nn.Linear]:
    torch.manual_seed(0)
    lin = nn.Linear(24, 20)
    base = BaseView(lin)
    return SHiRA(base, SHiRAConfig(**kw)), base, lin


def test_count_mask_and_sorted_indices() -> None:
    a, base, _ = _adapter(r=2, random_seed=3)
    n = 2 * (24 + 20)
    assert a.values.numel() == n == SHiRA.expected_trainable(base, a.config)
    assert a.indices.shape == (2, n) and a.indices.dtype == torch.int32
    mask = random_mask(20, 24, n, 3)
    assert int(mask.sum()) == n
    rows, cols = torch.where(mask)
    assert torch.equal(a.indices.long(), torch.stack([rows, cols]))  # row-major sorted, as PEFT
    flat = a.indices[0].long() * 24 + a.indices[1].long()
    assert torch.equal(flat, flat.unique())  # distinct and sorted


def test_same_seed_same_mask_other_seed_other_mask() -> None:
    a, _, _ = _adapter(r=2, random_seed=3)
    b, _, _ = _adapter(r=2, random_seed=3)
    c, _, _ = _adapter(r=2, random_seed=4)
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    # random_seed=None falls back to the config's seed
    d, _, _ = _adapter(r=2, seed=3)
    assert torch.equal(a.indices, d.indices)


def test_magnitude_mask_takes_largest_weights() -> None:
    a, _, lin = _adapter(r=1, mask_type="magnitude")
    n = 44
    chosen = lin.weight.abs()[a.indices[0].long(), a.indices[1].long()]
    rest = lin.weight.abs().flatten().sort(descending=True).values
    assert chosen.min() >= rest[n - 1] and chosen.numel() == n


def test_too_large_r_raises() -> None:
    with pytest.raises(InvalidConfigError, match="more than"):
        _adapter(r=20)


def test_update_stays_on_mask_after_training_and_grad_only_on_values() -> None:
    model = pk.adapt(make_tiny_net(), SHiRAConfig(r=1, targets=["fc1", "fc2"], random_seed=0))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randint(0, 40, (4, 5))
    model(x).pow(2).mean().backward()
    assert all(not p.requires_grad or n.endswith("values") for n, p in model.named_parameters())
    opt.step()
    for path, a in model.adapter_modules("default").items():
        layer = model.get_submodule(f"model.{path}")
        d = a.delta_weight(layer.base)
        mask = torch.zeros_like(d, dtype=torch.bool)
        mask[a.indices[0].long(), a.indices[1].long()] = True
        assert torch.count_nonzero(d[~mask]) == 0 and torch.count_nonzero(d[mask]) > 0


def test_rank_exceeds_r_and_merge_exact() -> None:
    a, base, lin = _adapter(r=1, init="randn")
    d = a.delta_weight(base)
    assert torch.linalg.matrix_rank(d).item() > 1
    x = torch.randn(5, 24)
    with torch.no_grad():
        torch.testing.assert_close(a(x, lin(x), base), nn.functional.linear(x, lin.weight + d, lin.bias))
        torch.testing.assert_close(a(x, lin(x), base), lin(x) + x @ d.T, atol=1e-5, rtol=1e-5)


def test_indices_saved_so_reload_is_exact(tmp_path) -> None:
    model = pk.adapt(make_tiny_net(), SHiRAConfig(r=1, targets=["fc1"], random_seed=1), name="a")
    a = model.adapter_modules("a")["fc1"]
    with torch.no_grad():
        a.values.normal_()
        a.indices.copy_(a.indices.flip(1))  # any stored mask (a custom one, say) reloads as saved
    model.save(tmp_path / "s")
    loaded = pk.load(make_tiny_net(), tmp_path / "s")
    assert torch.equal(loaded.adapter_modules("a")["fc1"].indices, a.indices)


CASES = {
    "bert": (tiny_bert, dict(r=2, target_modules=["query", "value", "dense"], random_seed=42)),
    "net": (make_tiny_net, dict(r=1, target_modules=["fc1", "fc2"], random_seed=7)),
}


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_parity(case: str) -> None:
    peft = pytest.importorskip("peft")
    factory, kw = CASES[case]
    base = factory()
    pm = peft_model(base, peft.ShiraConfig(**kw))
    fill(pm, "shira_")
    ours = pk.adapt(base, SHiRAConfig(r=kw["r"], targets=kw["target_modules"], random_seed=kw["random_seed"]), name="a")
    copied = 0
    with torch.no_grad():
        for path, a in ours.adapter_modules("a").items():
            layer = pm.get_submodule(f"base_model.model.{path}")
            assert torch.equal(a.indices.cpu(), layer.shira_indices["default"].cpu())  # same mask from the seed
            a.values.copy_(layer.shira_weight["default"])
            copied += 1
    assert copied == sum(1 for n, _ in pm.named_parameters() if "shira_" in n)
    vocab = 40 if factory is make_tiny_net else 64
    x = torch.randint(0, vocab, (3, 6), generator=torch.Generator().manual_seed(1))
    assert_parity(pm, ours, x)
    assert_grad_parity(pm, ours, x, "shira_", rename=lambda n: "weight")
