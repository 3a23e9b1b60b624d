"""DiffoRA (inferred): search, discretisation, weight sharing."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert

import peftkit as pk
from peftkit.errors import UnsupportedAdapterError
from peftkit.methods.diffora import DiffoRASearch, discretize, gammas

IDS = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(0))


def loss(m, ids):
    return m(input_ids=ids).last_hidden_state.pow(2).mean()


def test_search_discretize_finetune() -> None:
    cfg = pk.get_config("diffora", r=2, alpha=4.0, keep_ratio=0.5, targets=["query", "key", "value"], seed=0)
    model = pk.adapt(tiny_bert(), cfg)
    assert set(gammas(model, "default").values()) == {0.5}
    search = DiffoRASearch(model, "default", loss, lr=1e-2, arch_lr=5e-2)
    model.train()
    for _ in range(3):
        search.step(IDS[:2], IDS[2:])
    g = gammas(model, "default")
    assert len(set(g.values())) > 1  # θ received gradients in the search phase
    mods = model.adapter_modules("default")
    keep = sorted(g, key=g.get, reverse=True)[:3]
    shared = {p: (mods[p].A.clone(), mods[p].B.clone()) for p in keep}
    new = discretize(model, "default")
    assert new.phase == "finetune"
    after = model.adapter_modules("default")
    assert sorted(after) == sorted(keep)  # exactly round(0.5 · 6) modules adapted
    for p, m in after.items():
        assert m.theta is None
        assert torch.equal(m.A, shared[p][0]) and torch.equal(m.B, shared[p][1])
    model.train()
    loss(model, IDS).backward()
    assert all(m.B.grad is not None for m in after.values())
    model.eval()
    with torch.no_grad():
        out = model(input_ids=IDS).last_hidden_state
        merged = model.merge(unload=False)(input_ids=IDS).last_hidden_state
    torch.testing.assert_close(merged, out, atol=1e-5, rtol=0)


def test_gamma_scales_the_lora_branch() -> None:
    model = pk.adapt(tiny_bert(), pk.get_config("diffora", r=2, targets=["query"], seed=0))
    m = next(iter(model.adapter_modules("default").values()))
    with torch.no_grad():
        m.B.normal_()
        m.theta.copy_(torch.tensor([1.0, -1.0]))
    x = torch.randn(3, 32)
    gamma = torch.softmax(torch.tensor([1.0, -1.0]), 0)[0]
    got = m(x, torch.zeros(3, 32), None)
    torch.testing.assert_close(got, gamma * m.config.scale * (x @ m.A.T @ m.B.T))


def test_helpers_refuse_another_methods_adapter_naming_it() -> None:
    """gammas / discretize on a LoRA adapter: UnsupportedAdapterError naming its method (was a bare ValueError
    'holds no DiffoRA module')."""
    model = pk.adapt(tiny_bert(), pk.get_config("lora", r=2, targets=["query"]))
    with pytest.raises(UnsupportedAdapterError, match="'lora' adapter, not a DiffoRA"):
        gammas(model, "default")
