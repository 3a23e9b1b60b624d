"""LoRD: Eckart–Young error, parameter counts, full rank = the layer, budgeted ranks, trainable factors."""

from __future__ import annotations

import pytest
import torch

import peftkit as pk
from peftkit.compress import lord
from peftkit.compress.arch import FactoredLinear
from peftkit.compress.errors import CalibrationError, RankError, RatioError, UnknownArchitectureError
from tests.compress import _tiny


def test_eckart_young_error_and_parameter_count():
    model = _tiny.llama()
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    plan = lord.lord(model, ranks={"model.layers.0.mlp.up_proj": 5})
    f = model.model.layers[0].mlp.up_proj
    assert isinstance(f, FactoredLinear) and f.rank == 5
    s = torch.linalg.svdvals(w.double())
    err = float((w.double() - f.weight_product().detach().double()).square().sum())
    assert err == pytest.approx(float(s[5:].square().sum()), rel=1e-4)
    assert sum(p.numel() for p in f.parameters()) == 5 * (32 + 48)
    assert plan.params_before - plan.params_after == 32 * 48 - 5 * 80
    assert plan.ranks["model.layers.0.mlp.down_proj"] is None  # not in ranks: stays dense


def test_full_rank_reproduces_the_model_and_factors_train_with_lora():
    model, ids = _tiny.llama(), _tiny.batches(n=1)[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    full = {p: min(m.weight.shape) for p, m in lord.arch.block_linears(model, "t").items()}
    lord.lord(model, ranks=full)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-5)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    f = model.model.layers[1].self_attn.q_proj
    assert f[0].weight.grad is not None and f[1].weight.grad is not None  # both factors receive gradients
    adapted = pk.adapt(model, pk.LoRAConfig(r=2, targets=["q_proj.0", "q_proj.1"]))  # LoRA on both factors
    assert len(adapted.layer_paths[adapted.adapter_names[0]]) == 6


def test_budget_meets_the_ratio_and_beats_uniform_on_energy():
    model = _tiny.llama(layers=2)
    with torch.no_grad():  # make layers differ in spectrum so the budget has something to choose
        model.model.layers[0].mlp.down_proj.weight.mul_(torch.logspace(0, -3, 48))
    spectra = {p: lord.spectrum(m.weight) for p, m in lord.arch.block_linears(model, "t").items()}
    shapes = {p: (m.out_features, m.in_features) for p, m in lord.arch.block_linears(model, "t").items()}
    plan = lord.allocate(spectra, shapes, 0.5)
    assert plan.params_after <= 0.5 * plan.params_before
    kept = {p: (k or 10**9) for p, k in plan.ranks.items()}
    uniform = {p: lord.uniform_rank(i, o, 0.5) for p, (o, i) in shapes.items()}

    def lost(ranks):
        return sum(float(spectra[p][ranks[p] :].sum() / spectra[p].sum()) for p in ranks)

    assert lost(kept) < lost(uniform)
    assert plan.ranks["model.layers.0.mlp.down_proj"] < uniform["model.layers.0.mlp.down_proj"]


def test_feature_mode_and_uniform_allocation():
    model, data = _tiny.llama(), _tiny.batches()
    plan = lord.lord(model, ratio=0.4, mode="feature", calibration=data)
    assert plan.params_after <= 0.6 * plan.params_before
    uniform = lord.lord(_tiny.llama(), ratio=0.5, allocation="uniform")
    assert set(uniform.ranks.values()) == {lord.uniform_rank(32, 32, 0.5), lord.uniform_rank(32, 16, 0.5),
                                           lord.uniform_rank(32, 48, 0.5)}  # fmt: skip


def test_bad_input():
    with pytest.raises(RatioError):
        lord.lord(_tiny.llama(), ratio=1.0)
    with pytest.raises(RankError, match="q_proj"):
        lord.lord(_tiny.llama(), ranks={"model.layers.0.self_attn.q_proj": 40})
    with pytest.raises(CalibrationError, match="empty"):
        lord.lord(_tiny.llama(), ratio=0.5, mode="feature")
    with pytest.raises(UnknownArchitectureError, match=r"mlp\.down_proj"):
        lord.lord(torch.nn.Sequential(torch.nn.Linear(3, 3)), ratio=0.5)


def test_progress_bars_are_shown_only_when_asked(capsys):
    from peftkit.compress.lord import lord as run

    run(_tiny.llama(layers=2), ratio=0.3)
    assert "factorising" not in capsys.readouterr().err
    run(_tiny.llama(layers=2), ratio=0.3, progress=True)
    err = capsys.readouterr().err
    assert "LoRD spectra" in err and "factorising" in err
