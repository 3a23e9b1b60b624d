"""CoLoRA (inferred): rank allocation from contributions, per-layer ranks, save/load."""

from __future__ import annotations

import itertools

import torch
from conftest import tiny_bert

import peftkit as pk
from peftkit.methods.colora import add_colora, colora_ranks, pilot_contributions, weight_contributions
from peftkit.train.ranks import rank_report

IDS = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(0))


def test_ranks_follow_contributions_and_budget() -> None:
    c = {f"l{i}": v for i, v in enumerate([0.1, 0.5, 0.05, 0.9, 0.3, 0.02])}
    ranks = colora_ranks(c, r_avg=8)
    assert abs(sum(ranks.values()) - 8 * len(c)) <= len(c)
    order = sorted(c, key=c.get)
    assert all(ranks[a] <= ranks[b] for a, b in itertools.pairwise(order))
    assert min(ranks.values()) >= 1
    assert colora_ranks(dict.fromkeys(c, 0.0), r_avg=4) == dict.fromkeys(c, 4)


def test_weight_contributions() -> None:
    w0 = {"a": torch.ones(2, 2), "b": torch.ones(2, 2)}
    w1 = {"a": torch.ones(2, 2) * 1.5, "b": torch.ones(2, 2)}
    assert weight_contributions(w0, w1) == {"a": 0.5, "b": 0.0}


def test_pilot_then_per_layer_lora_save_load(tmp_path) -> None:
    base = tiny_bert()
    batches = [IDS[:2], IDS[2:]] * 2

    def loss(m, ids):
        return m(input_ids=ids).last_hidden_state.pow(2).mean()

    contrib = pilot_contributions(base, batches, loss, targets=["query", "value"], lr=1e-3)
    assert len(contrib) == 4 and all(v > 0 for v in contrib.values())
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), tiny_bert().parameters()))  # ran on a copy
    grads = pilot_contributions(base, batches, loss, targets=["query", "value"], mode="grad_norm")
    assert set(grads) == set(contrib)
    ranks = {p: 1 + i for i, p in enumerate(contrib)}
    model = pk.adapt(tiny_bert(), pk.LoRAConfig(r=1, targets=["key"]))
    add_colora(model, "co", ranks)
    assert rank_report(model, "co") == ranks
    model.set_adapter("co")
    # forward equals a plain LoRA made of the first r_l components (s = 1)
    with torch.no_grad():
        for m in model.adapter_modules("co").values():
            m.B.normal_()
        model.eval()
        out = model(input_ids=IDS).last_hidden_state
        for path, m in model.adapter_modules("co").items():  # each layer allocates exactly its own rank
            assert m.A.shape[0] == m.B.shape[1] == ranks[path]
        path, m = next(iter(model.adapter_modules("co").items()))
        x = torch.randn(3, 32)
        got = m(x, torch.zeros(3, 32), model.get_submodule(f"model.{path}").base)
        torch.testing.assert_close(got, x @ m.A.T @ m.B.T)
    assert model.trainable_parameters().trainable == sum(r * (32 + 32) for r in ranks.values())
    model.save(tmp_path / "co", names="co")
    loaded = pk.load(tiny_bert(), tmp_path / "co")
    assert rank_report(loaded) == ranks
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).last_hidden_state, out)  # per-layer ranks restored
        merged = loaded.merge(unload=False)(input_ids=IDS).last_hidden_state
        torch.testing.assert_close(merged, out, atol=1e-5, rtol=0)
