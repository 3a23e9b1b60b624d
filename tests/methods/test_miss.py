"""MiSS / Bone spec properties (counts, tiled Dᵀ ΔW with a partial last shard, Bone block formula, identity
at init, exact merge, Bone's inverse unmerge formula) and parity with PEFT's ``MissConfig`` in every mode."""

from __future__ import annotations

import pytest
import torch
from _structured_parity import assert_grad_parity, assert_parity, fill, peft_model
from conftest import make_tiny_net, tiny_bert
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.errors import InvalidConfigError
from peftkit.methods.miss import MiSS, MiSSConfig


def _adapter(d_in: int = 10, d_out: int = 8, **kw: object) -> tuple[MiSS, BaseView, nn.Linear]:
    torch.manual_seed(0)
    lin = nn.Linear(d_in, d_out)
    base = BaseView(lin)
    return MiSS(base, MiSSConfig(init="kaiming", **kw)), base, lin


@pytest.mark.parametrize(("mode", "count"), [("miss", 4 * 8), ("mini", 4 * 2), ("bat", 8 * 4)])
def test_counts(mode: str, count: int) -> None:
    a, base, _ = _adapter(d_in=12, r=4, mode=mode, mini_r=2)
    assert a.block.numel() == count == MiSS.expected_trainable(base, a.config)


@pytest.mark.parametrize("mode", ["miss", "mini"])
def test_shared_delta_is_tiled_block_with_partial_shard(mode: str) -> None:
    a, base, lin = _adapter(r=4, mode=mode, mini_r=2)  # d_in = 10: shards 4 + 4 + 2 (padded)
    d = a.shared(8)
    want = torch.empty(8, 10)
    for o in range(8):
        for j in range(10):
            want[o, j] = d[j % 4, o]
    torch.testing.assert_close(a.delta_weight(base), want)
    x = torch.randn(3, 5, 10)
    with torch.no_grad():
        torch.testing.assert_close(a(x, lin(x), base), lin(x) + x @ want.T, atol=1e-5, rtol=1e-5)


def test_bat_block_formula_and_inverse_unmerge() -> None:
    a, base, lin = _adapter(d_in=12, r=4, mode="bat")
    with torch.no_grad():
        a.block.mul_(0.1)
    w, b = lin.weight.detach(), a.block.detach()
    want = torch.empty(8, 12)
    for i in range(2):
        for j in range(3):
            wij = w[4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
            want[4 * i : 4 * i + 4, 4 * j : 4 * j + 4] = wij @ b[i] + b[i]
    torch.testing.assert_close(a.delta_weight(base), want, atol=1e-6, rtol=1e-5)
    # Bone's unmerge W_ij = (W'_ij - B_i)(I + B_i)^-1 restores W
    merged = w + want
    for i in range(2):
        for j in range(3):
            blk = merged[4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
            back = (blk - b[i]) @ torch.linalg.inv(torch.eye(4) + b[i])
            torch.testing.assert_close(back, w[4 * i : 4 * i + 4, 4 * j : 4 * j + 4], atol=1e-4, rtol=0)
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(a(x, lin(x), base), lin(x) + x @ want.T, atol=1e-5, rtol=1e-5)


def test_identity_at_init_and_errors() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(10, 8)
    base = BaseView(lin)
    x = torch.randn(2, 10)
    for mode in ("miss", "mini"):
        a = MiSS(base, MiSSConfig(r=4, mode=mode, mini_r=2))
        torch.testing.assert_close(a(x, lin(x), base), lin(x), atol=0, rtol=0)
    with pytest.raises(InvalidConfigError, match="bat"):
        MiSS(base, MiSSConfig(r=4, mode="bat"))
    with pytest.raises(InvalidConfigError, match="mini_r"):
        MiSS(base, MiSSConfig(r=4, mode="mini", mini_r=3))
    with pytest.raises(InvalidConfigError, match="at most"):
        MiSS(base, MiSSConfig(r=11))
    with pytest.raises(InvalidConfigError, match="mode"):
        MiSSConfig(mode="bone")


CASES = {
    "bert-miss": (tiny_bert, dict(r=4, target_modules=["query", "value", "dense"]), {}),
    "bert-bat": (tiny_bert, dict(r=4, target_modules=["query", "dense"], init_weights="bat"), dict(mode="bat")),
    "net-pad": (make_tiny_net, dict(r=3, target_modules=["fc1", "fc2"]), {}),
    "net-mini": (
        make_tiny_net,
        dict(r=4, mini_r=4, target_modules=["fc1", "fc2"], init_weights="mini"),
        {"mode": "mini"},
    ),
}


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_parity(case: str) -> None:
    peft = pytest.importorskip("peft")
    factory, kw, extra = CASES[case]
    base = factory()
    pm = peft_model(base, peft.MissConfig(**kw))
    fill(pm, "miss_", std=0.1)
    cfg = {k: v for k, v in kw.items() if k in ("r", "mini_r")}
    ours = pk.adapt(base, MiSSConfig(targets=kw["target_modules"], **cfg, **extra), name="a")
    copied = 0
    with torch.no_grad():
        for path, a in ours.adapter_modules("a").items():
            a.block.copy_(pm.get_submodule(f"base_model.model.{path}").miss_block["default"])
            copied += 1
    assert copied == sum(1 for n, _ in pm.named_parameters() if "miss_" in n)
    assert ours.trainable_parameters().trainable == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    x = torch.randint(0, 40 if factory is make_tiny_net else 64, (3, 6), generator=torch.Generator().manual_seed(1))
    assert_parity(pm, ours, x)
    assert_grad_parity(pm, ours, x, "miss_", rename=lambda n: "block")
