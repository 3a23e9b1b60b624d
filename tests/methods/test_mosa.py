"""MoSA: the index map is a seeded partition with numel/N ± 1 entries per expert, identity at init (train and
eval), one training step with expert k changes W only where P == k, eval equals a plain AdaptFormer-with-LN
adapter with W/N and the mean bias (merge_experts), and the merged adapter has a plain adapter's size."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit

import peftkit as pk
from peftkit.core.errors import InvalidConfigError
from peftkit.methods.bottleneck import BottleneckBranch, ParallelAdapter
from peftkit.methods.mosa import MoSA, MoSAConfig, consistency_loss, merge_experts, partition

PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model(pixel_values=PIXELS).logits


def test_partition() -> None:
    for n in (2, 3, 4, 7):
        score = torch.rand(13, 5, generator=torch.Generator().manual_seed(n))
        p = partition(score, n)
        masks = torch.stack([(p == k) for k in range(n)])
        assert torch.equal(masks.sum(0), torch.ones(13, 5, dtype=torch.long))  # every entry in exactly one
        sizes = masks.flatten(1).sum(1)
        assert ((sizes - 65 / n).abs() <= 1).all()
        assert torch.equal(p, partition(score.clone(), n))
    # lowest scores go to expert 0, highest to the last (the official kthvalue slabs)
    p = partition(torch.arange(8.0), 4)
    assert p.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    a = pk.adapt(tiny_vit(), MoSAConfig(r=4, seed=5)).adapter_modules("default")
    b = pk.adapt(tiny_vit(), MoSAConfig(r=4, seed=5)).adapter_modules("default")
    assert all(torch.equal(a[k].P, b[k].P) for k in a)  # same seed, same P


def test_identity_and_count() -> None:
    want = _logits(tiny_vit())
    model = pk.adapt(tiny_vit(), MoSAConfig(r=4, experts=4, seed=0))
    assert model.trainable_parameters().trainable == 2 * (2 * 32 + 4 * 32 + 4 + 4 * 32 + 4 * 32)
    for train in (True, False):
        model.train(train)
        torch.testing.assert_close(_logits(model), want, atol=1e-6, rtol=0)  # with grad: experts drawn


def test_one_step_changes_only_the_drawn_expert(monkeypatch) -> None:
    model = pk.adapt(tiny_vit(), MoSAConfig(r=4, experts=4, dropout=0.0, seed=0)).train()
    adapters = list(model.adapter_modules("default").values())
    with torch.no_grad():
        for a in adapters:  # make the up-weight gradient flow (down is random already; W starts at 0)
            a.b.normal_(std=0.1)
    drawn: list[int] = []
    original = torch.randint

    def spy(*args, **kwargs):
        k = original(*args, **kwargs)
        drawn.append(int(k))
        return k

    before = [a.W.detach().clone() for a in adapters]
    monkeypatch.setattr(torch, "randint", spy)  # record which expert each adapter drew
    loss = _logits(model).pow(2).sum()
    monkeypatch.undo()
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    assert len(drawn) == len(adapters)
    for a, w0, k in zip(adapters, before, drawn):
        changed = a.W.detach() != w0
        assert changed.any()
        assert not (changed & (a.P != k)).any(), "entries of other experts changed"


def test_eval_equals_merged_plain_adapter(tmp_path) -> None:
    model = pk.adapt(tiny_vit(), MoSAConfig(r=4, experts=3, seed=0), name="mosa").eval()
    with torch.no_grad():
        for a in model.adapter_modules("mosa").values():
            for p in a.parameters():
                p.add_(torch.randn_like(p) * 0.2)
    want = _logits(model)
    name = merge_experts(model, "mosa")
    model.set_adapter(name)
    for path, plain in model.adapter_modules(name).items():
        mosa = model.adapter_modules("mosa")[path]
        assert isinstance(plain, ParallelAdapter) and isinstance(mosa, MoSA)
        torch.testing.assert_close(plain.branch.up.weight, mosa.W / 3)
        torch.testing.assert_close(plain.branch.up.bias, mosa.b.mean(0))
    model.eval()
    torch.testing.assert_close(_logits(model), want, atol=1e-6, rtol=0)
    model.delete_adapter("mosa")
    count = BottleneckBranch.count(32, 32, 4, in_ln=True, learnable_scale=False)
    assert count == 2 * 32 + 2 * 4 * 32 + 4 + 32  # a plain adapter with LN: 2d + 2rd + r + d
    assert model.trainable_parameters().trainable == 2 * count
    model.save(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(_logits(pk.load(tiny_vit(), tmp_path / "merged")), want, atol=1e-6, rtol=0)


def test_consistency_loss_and_config() -> None:
    a = torch.randn(4, 5)
    assert consistency_loss(a, a.clone()).item() == pytest.approx(0.0, abs=1e-7)
    b = torch.randn(4, 5, requires_grad=True)
    loss = consistency_loss(a, b)
    loss.backward()
    assert loss.item() > 0 and b.grad is not None
    with pytest.raises(InvalidConfigError, match="experts"):
        MoSAConfig(experts=0)
    with pytest.raises(TypeError, match="not a MoSA"):
        merge_experts(pk.adapt(tiny_vit(), pk.LoRAConfig(r=2, targets=["q_proj"])), "default")
