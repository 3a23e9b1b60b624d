"""IncreLoRA: the spec's properties (allocation counts, budget, merge, gradients of new parameters)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert

import peftkit as pk
from peftkit.errors import UnsupportedAdapterError
from peftkit.methods.increlora import IncreLoRAAllocator, increlora_orth_penalty
from peftkit.train import TrainConfig, Trainer
from peftkit.train.callbacks import GrowthCallback
from peftkit.train.ranks import rank_report

IDS = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(0))


def model_with(**kw) -> pk.AdaptedModel:
    cfg = pk.get_config("increlora", targets=["query", "key", "value"], seed=0, **kw)
    return pk.adapt(tiny_bert(), cfg)


def train_step(model, opt) -> None:
    model.train()
    model(input_ids=IDS).last_hidden_state.pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def test_allocation_counts_and_budget() -> None:
    model = model_with(r=1, target_rank=4, top_h=4, init_warmup=1, incre_interval=2)  # 6 modules, +2 each
    alloc = IncreLoRAAllocator(model)
    assert alloc.target_total == 24 and alloc.total_rank == 6
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    expected_sizes = [4, 4, 1]  # remaining increments: 9 -> 5 -> 1 -> 0
    for step in range(1, 12):
        train_step(model, opt)
        model.step_adapters(step)
        before = {p: m.effective_rank() for p, m in alloc.modules.items()}
        new = alloc.step(step)
        if new:
            opt.add_param_group({"params": new})
        after = {p: m.effective_rank() for p, m in alloc.modules.items()}
        grown = [p for p in after if after[p] != before[p]]
        assert all(after[p] - before[p] == 2 for p in grown)
        assert alloc.total_rank <= alloc.target_total
        if grown:
            assert alloc.due(step) and len(grown) == expected_sizes.pop(0)
    assert expected_sizes == [] and alloc.done and alloc.total_rank == 24
    assert all(float(m.E_res.abs().sum()) == 0 and not m.tracking for m in alloc.modules.values())


def test_top_priority_modules_grow() -> None:
    model = model_with(r=1, target_rank=2, top_h=2, init_warmup=0, incre_interval=1)
    alloc = IncreLoRAAllocator(model)
    paths = list(alloc.modules)
    for i, p in enumerate(paths):
        alloc.modules[p].exp_avg_ipt = alloc.modules[p].exp_avg_unc = float(i)
    alloc.step(1)
    assert alloc.history[0]["grown"] == paths[::-1][:2]


def test_importance_ema_from_backward() -> None:
    model = model_with(beta1=0.5, beta2=0.5)
    m = next(iter(model.adapter_modules("default").values()))
    model.train()
    model(input_ids=IDS).last_hidden_state.pow(2).mean().backward()
    score = m._score
    assert score is not None and score > 0  # advance learning: the reserve makes ΔW nonzero
    m.step(1)
    assert m.exp_avg_ipt == pytest.approx(0.5 * score) and m.exp_avg_unc == pytest.approx(0.25 * score)


def test_new_parameters_train_and_merge_is_exact() -> None:
    model = model_with(r=1, target_rank=4, init_warmup=0, incre_interval=1)
    alloc = IncreLoRAAllocator(model)
    new = alloc.step(1)
    assert len(new) == 3 * 5 and all(p.requires_grad for p in new)
    opt = torch.optim.SGD(new, lr=0.1)
    model.train()
    model(input_ids=IDS).last_hidden_state.pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in new)
    opt.step()
    model.eval()
    with torch.no_grad():
        out = model(input_ids=IDS).last_hidden_state
        model.merge(unload=False)
        merged = model(input_ids=IDS).last_hidden_state
    torch.testing.assert_close(merged, out, atol=1e-5, rtol=0)


def test_grown_adapter_reloads_with_load_state_dict() -> None:
    model = model_with(r=1, target_rank=4, init_warmup=0, incre_interval=1)
    IncreLoRAAllocator(model).step(1)
    fresh = model_with(r=1, target_rank=4, init_warmup=0, incre_interval=1)
    for path, m in model.adapter_modules("default").items():
        f = fresh.adapter_modules("default")[path]
        f.load_state_dict(m.state_dict())
        assert f.effective_rank() == m.effective_rank()
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=IDS).last_hidden_state, model(input_ids=IDS).last_hidden_state)


def test_grown_adapter_reloads_with_pk_load(tmp_path) -> None:
    model = model_with(r=1, target_rank=4, top_h=2, init_warmup=0, incre_interval=1)
    alloc = IncreLoRAAllocator(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in (1, 2):
        train_step(model, opt)
        model.step_adapters(step)
        opt.add_param_group({"params": alloc.step(step)})
    ranks = rank_report(model)
    assert len(set(ranks.values())) > 1  # some modules grew, others did not: per-module shapes differ
    model.save(tmp_path / "grown")
    loaded = pk.load(tiny_bert(), tmp_path / "grown").eval()
    assert rank_report(loaded) == ranks
    assert not any(m.tracking for m in loaded.adapter_modules("default").values())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).last_hidden_state, model(input_ids=IDS).last_hidden_state)


def test_identity_at_init_spec_decision() -> None:
    base = tiny_bert()
    with torch.no_grad():
        ref = base(input_ids=IDS).last_hidden_state
        exact = model_with(advance_learn=False)(input_ids=IDS).last_hidden_state
        near = model_with()(input_ids=IDS).last_hidden_state
    torch.testing.assert_close(exact, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(near, ref, atol=1e-4, rtol=0)


def test_orth_penalty_per_vector_and_full() -> None:
    model = model_with(reg_orth_coef=0.3)
    mods = list(model.adapter_modules("default").values())
    vecs = [v for m in mods for v in [*m.A[0], *m.A_res, *m.B[0].T, *m.B_res.T]]
    want = 0.3 * torch.stack([(v.pow(2).sum() - 1).abs() for v in vecs]).mean()
    torch.testing.assert_close(increlora_orth_penalty(model), want)
    full = model_with(orth_mode="full")
    assert increlora_orth_penalty(full) > 0


def test_growth_under_our_trainer_and_rank_report() -> None:
    model = model_with(r=1, target_rank=2, top_h=2, init_warmup=1, incre_interval=1)
    alloc = IncreLoRAAllocator(model)
    data = [{"input_ids": row} for row in IDS]
    cfg = TrainConfig(max_steps=3, batch_size=2, progress=False, epochs=5)
    trainer = Trainer(
        model, cfg, data, loss_fn=lambda m, b: m(**b).last_hidden_state.pow(2).mean(), callbacks=[GrowthCallback(alloc)]
    )
    n0 = len(trainer.params)
    trainer.fit()
    assert [h["step"] for h in alloc.history] == [2, 3]
    assert len(trainer.params) == n0 + 2 * 2 * 3
    assert sum(rank_report(model).values()) == alloc.total_rank == 6 + 4


def test_helpers_refuse_another_methods_adapter_naming_it() -> None:
    """The allocator and the penalty on a LoRA adapter: UnsupportedAdapterError naming its method (was a bare
    ValueError 'holds no IncreLoRA module')."""
    model = pk.adapt(tiny_bert(), pk.get_config("lora", r=2, targets=["query"]))
    with pytest.raises(UnsupportedAdapterError, match="'lora' adapter, not a IncreLoRA"):
        IncreLoRAAllocator(model)
    with pytest.raises(UnsupportedAdapterError, match="'lora' adapter"):
        increlora_orth_penalty(model)
