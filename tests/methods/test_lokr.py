"""LoKr spec properties (factorization examples, Kronecker ΔW, efficient forward == dense, identity at
init, merged == unmerged) and parity with PEFT's ``LoKrConfig``."""

from __future__ import annotations

import pytest
import torch
from _structured_parity import assert_grad_parity, assert_parity, copy_into_ours, fill, peft_model
from conftest import make_tiny_net, tiny_bert
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.errors import InvalidConfigError
from peftkit.methods.lokr import LoKr, LoKrConfig, factorization


def test_factorization_examples() -> None:
    assert factorization(256) == (16, 16)
    assert factorization(128) == (8, 16)
    assert factorization(127) == (1, 127)
    assert factorization(128, 4) == (4, 32)
    assert factorization(12, 5) == (3, 4)  # 5 does not divide 12: search, m <= 5


def test_delta_is_scaled_kron_and_efficient_forward_matches_dense() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(24, 36)
    base = BaseView(lin)
    a = LoKr(base, LoKrConfig(r=2, alpha=6.0, decompose_both=True, init="random"))
    assert set(a.shapes) == {"w1_a", "w1_b", "w2_a", "w2_b"}
    w1, w2 = a.w1_a @ a.w1_b, a.w2_a @ a.w2_b
    torch.testing.assert_close(a.delta_weight(base), 3.0 * torch.kron(w1, w2))
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        dense = lin(x) + x @ a.delta_weight(base).T
        torch.testing.assert_close(a(x, lin(x), base), dense, atol=1e-5, rtol=1e-5)


def test_identity_at_init_and_counts() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(16, 32)
    base = BaseView(lin)
    for init in ("peft", "lycoris"):
        a = LoKr(base, LoKrConfig(r=2, init=init))
        assert torch.count_nonzero(a.delta_weight(base)) == 0
    model = pk.adapt(make_tiny_net(), LoKrConfig(r=2, targets=["fc1", "fc2", "conv"]))
    # fc1 16->32: w1 (4,4) full, w2 (8,4) -> 8x2 + 2x4; fc2 32->16: w1 (4,4), w2 (4,8) -> 4x2+2x8;
    # conv 4->6 (3x3): w1 (2,2), r=2 >= max(3,2)/2 -> full w2 (3,2,3,3)
    assert model.trainable_parameters().trainable == (16 + 16 + 8) + (16 + 8 + 16) + (4 + 54)


def test_conv_effective_cp_delta() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    base = BaseView(conv)
    a = LoKr(base, LoKrConfig(r=1, use_effective_conv2d=True, init="random"))
    assert "t2" in a.shapes
    w2 = torch.einsum("ijkl,ip,jr->prkl", a.t2, a.w2_a, a.w2_b)
    want = torch.kron(a.w1[:, :, None, None], w2) * 8.0
    torch.testing.assert_close(a.delta_weight(base), want)
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(a(x, conv(x), base), conv(x) + base.apply(x, want), atol=1e-5, rtol=1e-5)


def test_rank_and_module_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    base = BaseView(lin)
    a = LoKr(base, LoKrConfig(r=4, rank_dropout=0.5, module_dropout=0.0, init="random")).train()
    x = torch.randn(64, 16)
    out = a(x, lin(x), base) - lin(x)
    assert (out.abs().sum(0) == 0).any()  # some output rows of ΔW dropped
    a.eval()
    torch.testing.assert_close(a(x, lin(x), base) - lin(x), x @ a.delta_weight(base).T, atol=1e-5, rtol=1e-5)
    with pytest.raises(InvalidConfigError, match="module_dropout"):
        LoKrConfig(module_dropout=1.0)
    with pytest.raises(InvalidConfigError, match="decompose_factor"):
        LoKrConfig(decompose_factor=0)


# ---------------------------------------------------------------------------------------------- PEFT parity
CASES = {
    "bert": (tiny_bert, dict(r=2, alpha=4, target_modules=["query", "value", "dense"])),
    "bert-both": (tiny_bert, dict(r=1, alpha=3, target_modules=["query", "dense"], decompose_both=True)),
    "bert-factor": (tiny_bert, dict(r=16, alpha=8, target_modules=["key"], decompose_factor=4)),
    "net": (make_tiny_net, dict(r=2, alpha=5, target_modules=["fc1", "fc2", "conv"])),
    "net-cp": (make_tiny_net, dict(r=1, alpha=2, target_modules=["fc1", "conv"], use_effective_conv2d=True)),
}
OURS = {"alpha": "alpha", "decompose_both": "decompose_both", "decompose_factor": "decompose_factor"}


@pytest.mark.parity
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_parity(case: str) -> None:
    peft = pytest.importorskip("peft")
    factory, kw = CASES[case]
    base = factory()
    pm = peft_model(base, peft.LoKrConfig(**kw))
    fill(pm, "lokr_")
    cfg = {OURS.get(k, k): v for k, v in kw.items() if k != "target_modules"}
    ours = pk.adapt(base, LoKrConfig(targets=kw["target_modules"], **cfg), name="a")
    n_peft = sum(1 for n, _ in pm.named_parameters() if "lokr_" in n)
    assert copy_into_ours(pm, ours, "lokr_") == n_peft
    assert ours.trainable_parameters().trainable == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    vocab = 40 if factory is make_tiny_net else 64
    x = torch.randint(0, vocab, (3, 6), generator=torch.Generator().manual_seed(1))
    assert_parity(pm, ours, x)
    assert_grad_parity(pm, ours, x, "lokr_")
