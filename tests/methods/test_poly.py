"""Poly / MHR spec properties (shared/methods/adapters.md): identity at init, Q = S = 1 equals LoRA with scale c,
deterministic eval, per-head weights summing to 1, per-task exact merge, task ids through the core, MHR-z and
MHR-μ, routing plot, and parity with PEFT's ``PolyConfig`` on the same weights."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_net, tiny_bert
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.errors import (
    AdapterIdsError,
    InvalidConfigError,
    NotMergeableError,
    UnsupportedAdapterError,
    UnsupportedLayerError,
)
from peftkit.methods.poly import Poly, PolyConfig, mhr_mu, mhr_z, routing_table, set_task


def _randomise(model: pk.AdaptedModel, name: str, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in model.adapter_modules(name).values():
            a.B.copy_(torch.randn(a.B.shape, generator=g) * 0.3)
            a.module_logits.copy_(torch.randn(a.module_logits.shape, generator=g) * 2)


def _bert_inputs(rows: int = 4) -> torch.Tensor:
    return torch.randint(0, 64, (rows, 6), generator=torch.Generator().manual_seed(3))


def _poly_bert(**kw) -> pk.AdaptedModel:
    config = PolyConfig(targets=["query", "value"], r=2, n_skills=3, n_tasks=3, seed=0, **kw)
    model = pk.adapt(tiny_bert(), config).eval()
    _randomise(model, "default")
    return model


def test_trainable_count_and_shapes() -> None:
    model = pk.adapt(make_tiny_net(), PolyConfig(targets=["fc1"], r=2, n_skills=3, n_splits=2, n_tasks=5))
    a = model.adapter_modules("default")["fc1"]
    assert a.A.shape == (2, 3, 8, 2) and a.B.shape == (2, 3, 2, 16) and a.module_logits.shape == (5, 6)
    assert model.trainable_parameters().trainable == 3 * 2 * (16 + 32) + 5 * 2 * 3


def test_identity_at_init_and_init_ranges() -> None:
    base = make_tiny_net()
    x = torch.randint(0, 40, (4, 5))
    model = pk.adapt(make_tiny_net(), PolyConfig(targets=["fc1", "fc2"], n_tasks=2)).eval()
    torch.testing.assert_close(model(x, task_ids=[0, 1, 1, 0]), base(x), rtol=0, atol=0)
    for a in model.adapter_modules("default").values():
        assert torch.all(a.B == 0) and a.module_logits.abs().max() <= 1e-3
        bound = 1 / a.d_in**0.5  # kaiming_uniform(a=√5) on an (r, in/Q) slice: U(±1/√(in/Q)) with Q = 1
        assert a.A.abs().max() <= bound and a.A.abs().max() > bound / 2


def test_one_split_one_skill_equals_lora_with_scale_c() -> None:
    lin = nn.Linear(12, 10)
    torch.manual_seed(1)
    poly = Poly(BaseView(lin), PolyConfig(r=3, n_skills=1, scaling="alpha/r", alpha=6.0)).eval()
    with torch.no_grad():
        poly.B.normal_()
    x = torch.randn(4, 7, 12)
    want = lin(x) + 2.0 * x @ poly.A[0, 0] @ poly.B[0, 0]  # c = alpha / r = 2; with S = 1 the weight is exactly 1
    torch.testing.assert_close(poly(x, lin(x), BaseView(lin)), want, rtol=1e-5, atol=1e-6)


def test_mixing_weights_per_split_sum_to_one() -> None:
    poly = Poly(BaseView(nn.Linear(8, 8)), PolyConfig(r=2, n_skills=4, n_splits=2, n_tasks=3))
    with torch.no_grad():
        poly.module_logits.normal_(std=3.0)
    for mode in (True, False):
        poly.train(mode)
        w = poly.mixing_weights(torch.tensor([0, 1, 2, 2]))
        assert w.shape == (4, 2, 4) and (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(4, 2), rtol=0, atol=1e-6)
    assert poly.routing_weights(1).shape == (2, 4)
    torch.testing.assert_close(poly.routing_weights()[1], poly.routing_weights(1))


def test_eval_is_deterministic_training_samples() -> None:
    model = _poly_bert()
    ids = torch.tensor([0, 2, 1, 2])
    with torch.no_grad():
        first = model(_bert_inputs(), task_ids=ids).last_hidden_state
        torch.testing.assert_close(model(_bert_inputs(), task_ids=ids).last_hidden_state, first, rtol=0, atol=0)
        model.train()
        sampled = [model(_bert_inputs(), task_ids=ids).last_hidden_state for _ in range(2)]
    assert not torch.allclose(sampled[0], sampled[1]), "relaxed-Bernoulli routing did not sample in training"


def test_gradient_reaches_router_and_skills_in_training() -> None:
    model = _poly_bert()
    model.train()
    model(_bert_inputs(), task_ids=[0, 1, 2, 0]).last_hidden_state.square().mean().backward()
    for a in model.adapter_modules("default").values():
        assert a.module_logits.grad is not None and a.module_logits.grad.abs().sum() > 0
        assert a.A.grad.abs().sum() > 0 and a.B.grad.abs().sum() > 0


def test_rows_route_by_task_id() -> None:
    """A batch of mixed tasks equals each row run alone with its own task."""
    model = _poly_bert(n_splits=2)
    x, ids = _bert_inputs(), torch.tensor([2, 0, 2, 1])
    with torch.no_grad():
        mixed = model(x, task_ids=ids).last_hidden_state
        for i, t in enumerate(ids.tolist()):
            alone = model(x[i : i + 1], task_ids=[t]).last_hidden_state
            torch.testing.assert_close(mixed[i], alone[0], rtol=0, atol=1e-6)
        assert not torch.allclose(mixed[0], model(x, task_ids=[0, 0, 0, 0]).last_hidden_state[0])


def test_task_ids_required_with_several_tasks_and_range_checked() -> None:
    model = _poly_bert()
    with pytest.raises(AdapterIdsError, match="task_ids"):
        model(_bert_inputs())
    with pytest.raises(AdapterIdsError, match="n_tasks=3"):
        model(_bert_inputs(), task_ids=[0, 1, 3, 0])
    set_task(model, "default", 2)
    with torch.no_grad():
        torch.testing.assert_close(
            model(_bert_inputs()).last_hidden_state, model(_bert_inputs(), task_ids=[2] * 4).last_hidden_state
        )
    with pytest.raises(AdapterIdsError, match="out of range"):
        set_task(model, "default", 3)


def test_per_task_merge_is_exact() -> None:
    model = _poly_bert(n_splits=2)
    x = _bert_inputs()
    with pytest.raises(NotMergeableError, match="set_task"):
        model.merge(unload=False)
    for task in range(3):
        with torch.no_grad():
            want = model(x, task_ids=[task] * 4).last_hidden_state
        set_task(model, "default", task)
        model.merge(unload=False)
        with torch.no_grad():
            merged = model.get_base_model()(x).last_hidden_state
        torch.testing.assert_close(merged, want, rtol=0, atol=1e-5)
        model.unmerge()
    set_task(model, "default", 1)
    with torch.no_grad():
        want = model(x, task_ids=[1] * 4).last_hidden_state
        plain = model.merge()
        torch.testing.assert_close(plain(x).last_hidden_state, want, rtol=0, atol=1e-5)


def test_split_must_divide_features_and_config_checks() -> None:
    with pytest.raises(UnsupportedLayerError, match="n_splits=3"):
        Poly(BaseView(nn.Linear(8, 8)), PolyConfig(n_splits=3))
    with pytest.raises(InvalidConfigError, match="n_skills"):
        PolyConfig(n_skills=0)
    with pytest.raises(InvalidConfigError, match="scaling"):
        PolyConfig(scaling="1/sqrt(r)")
    with pytest.raises(InvalidConfigError, match="train_routing"):
        PolyConfig(train_routing="gumbel")


def test_mhr_z_freezes_skills_and_trains_a_fresh_router(tmp_path) -> None:
    model = _poly_bert(n_splits=2)
    mhr_z(model, "default", "fewshot", n_tasks=2, seed=5)
    assert model.active_adapters == ["fewshot"]
    new, old = model.adapter_modules("fewshot"), model.adapter_modules("default")
    for path, a in new.items():
        assert torch.equal(a.A, old[path].A) and torch.equal(a.B, old[path].B)
        assert [n for n, _ in a.named_parameters()] == ["module_logits"] and a.module_logits.shape == (2, 6)
        assert a.module_logits.abs().max() <= 1e-3
    trainable = model.trainable_parameters().trainable
    assert trainable == len(new) * 2 * 2 * 3
    model.train()
    model(_bert_inputs(), task_ids=[0, 1, 1, 0]).last_hidden_state.square().mean().backward()
    assert all(a.module_logits.grad.abs().sum() > 0 for a in new.values())
    model.save(tmp_path / "z")
    loaded = pk.load(tiny_bert(), tmp_path / "z")
    for path, a in loaded.adapter_modules("fewshot").items():
        assert torch.equal(a.A, new[path].A)


def test_mhr_mu_equals_the_uniform_weight_router() -> None:
    model = _poly_bert(n_splits=2)
    with torch.no_grad():  # equal logits: σ(0)/(S·σ(0) + 1e-12) = 1/S up to rounding
        for a in model.adapter_modules("default").values():
            a.module_logits.zero_()
        uniform = model(_bert_inputs(), task_ids=[0, 1, 2, 0]).last_hidden_state
    mhr_mu(model, "default", "mu")
    assert model.active_adapters == ["mu"] and model.configs["mu"].method == "lora"
    with torch.no_grad():
        torch.testing.assert_close(model(_bert_inputs()).last_hidden_state, uniform, rtol=0, atol=1e-6)


def test_routing_table_and_plot(tmp_path) -> None:
    from peftkit.train.routing import plot_routing

    model = _poly_bert(n_splits=2)
    table = routing_table(model, "default")
    assert len(table) == 4 and all(w.shape == (3, 2, 3) for w in table.values())
    png = plot_routing(model, tmp_path / "routing.png", adapter="default")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


@pytest.mark.parity
@pytest.mark.parametrize("n_splits", [1, 2])
def test_parity_with_peft_poly(n_splits: int) -> None:
    peft = pytest.importorskip("peft")
    settings = dict(r=2, n_tasks=3, n_skills=3, n_splits=n_splits)
    theirs = peft.get_peft_model(
        tiny_bert(), peft.PolyConfig(target_modules=["query", "value"], poly_type="poly", **settings)
    ).eval()
    ours = pk.adapt(tiny_bert(), PolyConfig(targets=["query", "value"], **settings)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for path, a in ours.adapter_modules("default").items():
            layer = theirs.base_model.model.get_submodule(path)
            layer.poly_lora_B["default"].normal_(generator=g)
            layer.poly_router["default"].module_logits.normal_(generator=g)
            a.A.copy_(layer.poly_lora_A["default"])
            a.B.copy_(layer.poly_lora_B["default"])
            a.module_logits.copy_(layer.poly_router["default"].module_logits)
    x, ids = _bert_inputs(), torch.tensor([1, 0, 2, 1])
    with torch.no_grad():
        want = theirs.base_model(input_ids=x, task_ids=ids).last_hidden_state  # PolyModel.forward takes task_ids
        got = ours(input_ids=x, task_ids=ids).last_hidden_state
    assert not torch.allclose(want, tiny_bert()(x).last_hidden_state, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parity
@pytest.mark.parametrize("n_splits", [1, 2])
def test_same_seed_gives_peft_init(n_splits: int) -> None:
    """Issue 12 item 16: PEFT draws A skill by skill, head by head within a skill (then the router's logits);
    with the same seed our A and logits are PEFT's, bit for bit (the head-first order gave another A for Q > 1)."""
    peft = pytest.importorskip("peft")
    settings = dict(r=2, n_tasks=3, n_skills=3, n_splits=n_splits)
    base = tiny_bert()
    torch.manual_seed(11)
    theirs = peft.get_peft_model(base, peft.PolyConfig(target_modules=["query", "value"], poly_type="poly", **settings))
    # A regex selects the modules in model order, the order PEFT builds (and draws) them in; a list of names
    # builds them target by target (every query, then every value).
    ours = pk.adapt(tiny_bert(), PolyConfig(targets=r".*\.(query|value)", seed=11, **settings))
    modules = ours.adapter_modules("default")
    assert len(modules) == 4
    for path, a in modules.items():
        layer = theirs.base_model.model.get_submodule(path)
        assert torch.equal(a.A, layer.poly_lora_A["default"]), path
        assert torch.equal(a.B, layer.poly_lora_B["default"]), path
        assert torch.equal(a.module_logits, layer.poly_router["default"].module_logits), path


def test_helpers_refuse_another_methods_adapter_naming_it() -> None:
    """set_task / routing_table / mhr_mu on a LoRA adapter: UnsupportedAdapterError naming its method (set_task
    raised AttributeError on the config's n_tasks, routing_table an InvalidConfigError)."""
    model = pk.adapt(tiny_bert(), pk.get_config("lora", r=2, targets=["query"]))
    with pytest.raises(UnsupportedAdapterError, match="'lora' adapter, not a Poly"):
        set_task(model, "default", 0)
    with pytest.raises(UnsupportedAdapterError, match="'lora' adapter, not a Poly"):
        routing_table(model, "default")
    with pytest.raises(UnsupportedAdapterError, match="'lora' adapter, not a Poly"):
        mhr_mu(model, "default", "mu")
    assert model.adapter_names == ["default"]
