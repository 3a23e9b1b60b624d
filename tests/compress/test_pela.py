"""PELA: rank formula, skipped modules, SVD init error, distillation losses and the frozen teacher."""

from __future__ import annotations

import pytest
import torch

from peftkit.compress import pela
from peftkit.compress.arch import FactoredLinear
from peftkit.compress.errors import RatioError, UnknownArchitectureError
from tests.compress import _tiny


def test_rank_formula_parameter_share_and_skipped_modules():
    assert pela.pela_rank(768, 3072, 0.5) == 307  # ⌊768·3072 / (2·3840)⌋
    model = _tiny.llama()
    head = model.lm_head.weight.detach().clone()
    original = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    teacher, plan = pela.pela(model, ratio=0.5)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, head)  # omitted
    assert abs(plan.params_after / plan.params_before - 0.5) < 0.1
    up = model.model.layers[0].mlp.up_proj
    assert isinstance(up, FactoredLinear) and up.rank == pela.pela_rank(32, 48, 0.5)
    s = torch.linalg.svdvals(original.double())
    err = float((up.weight_product().detach().double() - original.double()).square().sum())
    assert err == pytest.approx(float(s[up.rank :].square().sum()), rel=1e-4)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_full_rank_student_has_zero_feature_loss():
    model = _tiny.llama()
    teacher, _ = pela.pela(model, ratio=0.5)
    layers = pela.chosen(teacher)
    full = {p: min(m.weight.shape) for p, m in layers.items()}
    student = _tiny.llama()
    pela.factorize(student, pela.chosen(student), full)
    batch = dict(_tiny.batches(n=1)[0])
    batch["labels"] = batch["input_ids"]
    losses = pela.Distiller(student, teacher).losses(batch)
    assert float(losses["fm"]) < 1e-10 and float(losses["sr"]) < 1e-10
    assert float(losses["wp"]) < 1e-10


def test_distillation_trains_the_student_only_and_wp_reaches_only_factors():
    model, data = _tiny.llama(), _tiny.batches()
    for b in data:
        b["labels"] = b["input_ids"]
    teacher, _ = pela.pela(model, ratio=0.5)
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller = pela.Distiller(model, teacher, kd_beta=0.5, task=False)  # distillation only
    first = {k: float(v) for k, v in distiller.losses(data[0]).items() if v is not None}
    wp = pela.inf_norm(model, teacher)
    wp.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(".0.weight" in n or ".1.weight" in n for n in grads)
    model.zero_grad()
    history = pela.distill(distiller, data, steps=12, lr=3e-3)
    assert history[-1] < history[0]
    after = {k: float(v) for k, v in distiller.losses(data[0]).items() if v is not None}
    assert after["fm"] < first["fm"]
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, frozen[k])
    assert all(p.grad is None for p in teacher.parameters())


def test_bad_input():
    with pytest.raises(RatioError):
        pela.pela(_tiny.llama(), ratio=0.0)
    with pytest.raises(UnknownArchitectureError, match="outputs outside"):
        pela.pela(torch.nn.Sequential(torch.nn.Linear(3, 3)), ratio=0.5)
