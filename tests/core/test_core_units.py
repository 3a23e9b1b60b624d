"""Small unit tests of the core: target selection, modules_to_save, seeds, adapter_ids by name, routing."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyNet, make_tiny_net, tiny_bert, tiny_gpt2

import peftkit as pk
from peftkit.core.layer import AdaptedLayer


def adapted_paths(model: pk.AdaptedModel, name: str = "default") -> list[str]:
    return sorted(model.layer_paths[name])


# ------------------------------------------------------------------------------------------------ targets
def test_targets_by_suffix_match_every_layer() -> None:
    model = pk.adapt(tiny_bert(), pk.LoRAConfig(r=2, targets=["query", "value"]))
    assert adapted_paths(model) == sorted(
        f"encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")
    )


def test_targets_by_full_path_match_one_layer() -> None:
    model = pk.adapt(tiny_bert(), pk.LoRAConfig(r=2, targets=["encoder.layer.1.attention.self.query"]))
    assert adapted_paths(model) == ["encoder.layer.1.attention.self.query"]


def test_suffix_matches_whole_name_parts_only() -> None:
    model = pk.adapt(tiny_bert(), pk.LoRAConfig(r=2, targets=["dense"]))
    assert all(p.split(".")[-1] == "dense" for p in adapted_paths(model))
    with pytest.raises(pk.errors.TargetModuleNotFound):
        pk.adapt(tiny_bert(), pk.LoRAConfig(r=2, targets=["uery"]))  # not a suffix of a name part


def test_targets_by_regex_fullmatch() -> None:
    model = pk.adapt(tiny_bert(), pk.LoRAConfig(r=2, targets=r"encoder\.layer\.0\..*\.(query|key)"))
    assert adapted_paths(model) == ["encoder.layer.0.attention.self.key", "encoder.layer.0.attention.self.query"]


def test_all_linear_tiny_net_excludes_the_head(tiny_net: TinyNet) -> None:
    model = pk.adapt(tiny_net, pk.LoRAConfig(r=2))
    assert adapted_paths(model) == ["fc1", "fc2"]  # not the head, not the conv, not the embedding


def test_all_linear_gpt2_covers_conv1d_excludes_lm_head() -> None:
    model = pk.adapt(tiny_gpt2(), pk.LoRAConfig(r=2, targets="all-linear"))
    paths = adapted_paths(model)
    assert "lm_head" not in paths
    assert len(paths) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block
    assert all(p.rsplit(".", 1)[-1] in ("c_attn", "c_proj", "c_fc") for p in paths)


def test_all_linear_bert_classifier_excludes_the_classifier() -> None:
    model = pk.adapt(tiny_bert(num_labels=3), pk.LoRAConfig(r=2, targets="all-linear"))
    paths = adapted_paths(model)
    assert "classifier" not in paths
    assert "bert.pooler.dense" in paths and "bert.encoder.layer.0.attention.self.query" in paths


def test_exclude_by_suffix_and_regex(tiny_net: TinyNet) -> None:
    model = pk.adapt(make_tiny_net(), pk.LoRAConfig(r=2, exclude=["fc2"]))
    assert adapted_paths(model) == ["fc1"]
    model = pk.adapt(tiny_bert(), pk.LoRAConfig(r=2, targets=["query", "value"], exclude=r".*layer\.1\..*"))
    assert adapted_paths(model) == ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]


def test_exclude_everything_raises(tiny_net: TinyNet) -> None:
    with pytest.raises(pk.errors.TargetModuleNotFound):
        pk.adapt(tiny_net, pk.LoRAConfig(r=2, targets=["fc1"], exclude=["fc1"]))


# ----------------------------------------------------------------------------------------- modules_to_save
def test_modules_to_save_trains_the_whole_module(tiny_net: TinyNet, token_batch, tmp_path) -> None:
    model = pk.adapt(tiny_net, pk.LoRAConfig(r=2, targets=["fc1"], modules_to_save=["head"])).eval()
    assert adapted_paths(model) == ["fc1", "head"]
    assert type(model.adapter_modules("default")["head"]).method == "full"
    head = tiny_net.get_submodule("head").base_layer
    lora_count = 2 * (16 + 32)
    assert model.trainable_parameters().trainable == lora_count + head.weight.numel() + head.bias.numel()
    with torch.no_grad():  # identity at init: the dense delta of the head starts at zero
        torch.testing.assert_close(model(token_batch), make_tiny_net()(token_batch), atol=0, rtol=0)
    with torch.no_grad():
        for a in model.adapter_modules("default").values():
            for p in a.parameters():
                p.add_(0.1)
    out = model(token_batch)
    model.save(tmp_path / "ad")
    loaded = pk.load(make_tiny_net(), tmp_path / "ad").eval()
    assert adapted_paths(loaded) == ["fc1", "head"]
    torch.testing.assert_close(loaded(token_batch), out, atol=0, rtol=0)
    plain = loaded.merge()
    torch.testing.assert_close(plain(token_batch), out, atol=1e-5, rtol=0)


def test_modules_to_save_is_not_also_a_lora_target(tiny_net: TinyNet) -> None:
    model = pk.adapt(tiny_net, pk.LoRAConfig(r=2, targets=r"fc1|head", modules_to_save=["head"]))
    kinds = {p: type(a).method for p, a in model.adapter_modules("default").items()}
    assert kinds == {"fc1": "lora", "head": "full"}


# ----------------------------------------------------------------------------------------------- seeding
def _state(model: pk.AdaptedModel) -> dict[str, torch.Tensor]:
    return model.adapter_state_dict("default")


def test_seeded_adapters_are_reproducible() -> None:
    a = _state(pk.adapt(make_tiny_net(), pk.LoRAConfig(r=2, seed=3)))
    torch.manual_seed(123)  # the global RNG state does not matter
    b = _state(pk.adapt(make_tiny_net(), pk.LoRAConfig(r=2, seed=3)))
    c = _state(pk.adapt(make_tiny_net(), pk.LoRAConfig(r=2, seed=4)))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_seeded_adapter_leaves_the_global_rng_alone() -> None:
    net = make_tiny_net()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    pk.adapt(net, pk.LoRAConfig(r=2, seed=3))
    torch.testing.assert_close(torch.rand(3), expected, atol=0, rtol=0)


# -------------------------------------------------------------------------------------------- adapter_ids
def _two(token_batch) -> pk.AdaptedModel:
    model = pk.adapt(make_tiny_net(), pk.LoRAConfig(r=2, seed=0), name="a").eval()
    model.add_adapter("b", pk.LoRAConfig(r=2, seed=1))
    with torch.no_grad():
        for name in ("a", "b"):
            for adapter in model.adapter_modules(name).values():
                adapter.B.normal_()
    return model


def test_adapter_ids_as_names(token_batch) -> None:
    model = _two(token_batch)
    by_index = model(token_batch, adapter_ids=torch.tensor([0, 1, -1, 0]))
    by_name = model(token_batch, adapter_ids=["a", "b", None, "a"])
    mixed = model(token_batch, adapter_ids=["a", 1, -1, "a"])
    torch.testing.assert_close(by_name, by_index, atol=0, rtol=0)
    torch.testing.assert_close(mixed, by_index, atol=0, rtol=0)


def test_adapter_ids_follow_the_order_of_adding(token_batch) -> None:
    model = _two(token_batch)
    assert model.adapter_names == ["a", "b"]
    model.delete_adapter("a")
    assert model.adapter_names == ["b"]
    model.set_adapter("b")
    torch.testing.assert_close(model(token_batch, adapter_ids=[0, 0, 0, 0]), model(token_batch), atol=1e-6, rtol=0)


def test_routing_is_reset_after_an_exception_in_forward(token_batch) -> None:
    model = _two(token_batch)
    bad = token_batch.clone()
    bad[0, 0] = 10_000  # out of the embedding's range: the base forward raises mid-call
    with pytest.raises(IndexError):
        model(bad, adapter_ids=[0, 1, -1, 0])
    assert model.routing.call.adapter_ids is None
    model.set_adapter("b")
    want = model(token_batch)
    torch.testing.assert_close(model(token_batch), want, atol=0, rtol=0)  # no stale per-row routing
    torch.testing.assert_close(model(token_batch, adapter_ids=[1, 1, 1, 1]), want, atol=1e-6, rtol=0)


def test_wrappers_never_nest(token_batch) -> None:
    model = _two(token_batch)
    assert not any(isinstance(m.base_layer, AdaptedLayer) for m in model.modules() if isinstance(m, AdaptedLayer))
    assert sorted(model.get_submodule("model.fc1").adapters) == ["a", "b"]


def test_overrides_give_modules_their_own_settings(tmp_path) -> None:
    cfg = pk.LoRAConfig(
        r=2,
        alpha=4.0,
        targets=["query", "value"],
        overrides={"value": {"r": 4}, "encoder.layer.1.attention.self.value": {"r": 3, "alpha": 3.0}},
    )
    model = pk.adapt(tiny_bert(), cfg)
    shapes = {p: (m.A.shape[0], m.scale) for p, m in model.adapter_modules("default").items()}
    assert shapes == {
        "encoder.layer.0.attention.self.query": (2, 2.0),
        "encoder.layer.0.attention.self.value": (4, 1.0),  # suffix match; alpha stays 4
        "encoder.layer.1.attention.self.query": (2, 2.0),
        "encoder.layer.1.attention.self.value": (3, 1.0),  # the exact path wins over the suffix
    }
    model.save(tmp_path / "a")
    loaded = pk.load(tiny_bert(), tmp_path / "a")
    assert {p: (m.A.shape[0], m.scale) for p, m in loaded.adapter_modules("default").items()} == shapes
    assert loaded.configs["default"] == cfg


def test_overrides_are_checked_when_the_config_is_made() -> None:
    with pytest.raises(pk.errors.InvalidConfigError, match=r"overrides\['query'\].*r must be a positive integer"):
        pk.LoRAConfig(overrides={"query": {"r": 0}})
    with pytest.raises(pk.errors.InvalidConfigError, match=r"sets \['targets'\], which cannot vary per module"):
        pk.LoRAConfig(overrides={"query": {"targets": ["key"]}})
    with pytest.raises(pk.errors.InvalidConfigError, match=r"sets \['rank'\]"):
        pk.LoRAConfig(overrides={"query": {"rank": 4}})


def test_model_to_dtype_converts_base_and_adapters(tiny_net: TinyNet, token_batch) -> None:
    model = pk.adapt(tiny_net, pk.LoRAConfig(r=2, targets=["fc1", "conv"]))
    model.to(torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model(token_batch).dtype == torch.float64


def test_mixed_batch_bank_swaps_one_adapter_without_rebuilding_the_others(monkeypatch) -> None:
    """A server swapping adapters: only the new adapter is asked for its low-rank form; outputs stay exact,
    also when a name is deleted and added again (same routing order, new weights)."""
    from peftkit.methods.lora import LoRA

    net = make_tiny_net().eval()
    model = pk.adapt(net, pk.LoRAConfig(r=2, targets=["fc1"], seed=0), name="a0")
    for i in range(1, 6):
        model.add_adapter(f"a{i}", pk.LoRAConfig(r=2, targets=["fc1"], seed=i))
    for a in model.modules():
        if isinstance(a, LoRA):
            torch.nn.init.normal_(a.B)
    ids = torch.randint(0, 40, (6, 5), generator=torch.Generator().manual_seed(0))
    rows = torch.arange(6)

    def reference() -> torch.Tensor:
        outs = []
        for row, name in enumerate(model.adapter_names):
            model.set_adapter(name)
            outs.append(model(ids[row : row + 1]))
        return torch.cat(outs)

    calls = []
    original = LoRA.lowrank
    monkeypatch.setattr(LoRA, "lowrank", lambda self, base: calls.append(self) or original(self, base))
    with torch.no_grad():
        model(ids, adapter_ids=rows)
        assert len(calls) == 6
        calls.clear()
        model.delete_adapter("a2")
        model.add_adapter("a9", pk.LoRAConfig(r=2, targets=["fc1"], seed=9))
        torch.nn.init.normal_(model.adapter_modules("a9")["fc1"].B)
        got = model(ids, adapter_ids=rows)
        assert calls == [model.adapter_modules("a9")["fc1"]]  # the other five rows were copied over
        torch.testing.assert_close(got, reference(), atol=1e-6, rtol=0)
        model.delete_adapter("a9")  # same name again, same order, new weights
        model.add_adapter("a9", pk.LoRAConfig(r=2, targets=["fc1"], seed=10))
        torch.nn.init.normal_(model.adapter_modules("a9")["fc1"].B)
        torch.testing.assert_close(model(ids, adapter_ids=rows), reference(), atol=1e-6, rtol=0)


def _lora_model(ranks: list[int]) -> pk.AdaptedModel:
    """Adapters ``a0..`` with the given ranks on ``fc1`` and non-zero ``B`` (so each changes the output)."""
    from peftkit.methods.lora import LoRA

    model = pk.adapt(make_tiny_net().eval(), pk.LoRAConfig(r=ranks[0], targets=["fc1"], seed=0), name="a0")
    for i, r in enumerate(ranks[1:], start=1):
        model.add_adapter(f"a{i}", pk.LoRAConfig(r=r, targets=["fc1"], seed=i))
    for a in model.modules():
        if isinstance(a, LoRA):
            torch.nn.init.normal_(a.B)
    return model


def _per_adapter_reference(model: pk.AdaptedModel, ids: torch.Tensor) -> torch.Tensor:
    outs = []
    for row, name in enumerate(model.adapter_names):
        model.set_adapter(name)
        outs.append(model(ids[row : row + 1]))
    return torch.cat(outs)


def test_mixed_batch_bank_reuses_freed_rows_in_place() -> None:
    """Swapping adapters writes into the existing bank (no new tensor); a smaller adapter taking a larger
    one's row leaves no trace of the old values past its rank."""
    from peftkit.methods.lora import LoRA

    model = _lora_model([4, 2, 4])
    layer = model.get_submodule("model.fc1")
    ids = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(0))
    rows = torch.arange(3)
    with torch.no_grad():
        model(ids, adapter_ids=rows)
        packed = layer._bank.packed
        model.delete_adapter("a0")  # rank 4: its row is freed...
        model.add_adapter("a9", pk.LoRAConfig(r=1, targets=["fc1"], seed=9))  # ...and taken by a rank-1 adapter
        torch.nn.init.normal_(model.adapter_modules("a9")["fc1"].B)
        got = model(ids, adapter_ids=rows)
        assert layer._bank.packed is packed
        torch.testing.assert_close(got, _per_adapter_reference(model, ids), atol=1e-6, rtol=0)
        for i in range(3, 12):  # more adapters than rows: the bank grows and stays exact
            model.add_adapter(f"b{i}", pk.LoRAConfig(r=2, targets=["fc1"], seed=i))
        for a in model.modules():
            if isinstance(a, LoRA):
                torch.nn.init.normal_(a.B)  # in place: the version check rewrites every row
        many = torch.randint(0, 40, (len(model.adapter_names), 5), generator=torch.Generator().manual_seed(1))
        got = model(many, adapter_ids=torch.arange(len(model.adapter_names)))
        assert layer._bank.packed is not packed and layer._bank.packed.shape[0] > len(model.adapter_names)
        torch.testing.assert_close(got, _per_adapter_reference(model, many), atol=1e-6, rtol=0)


def test_mixed_batch_with_gradients_after_a_cached_bank() -> None:
    """An eval-mode mixed batch with gradients enabled builds its bank from the live tensors: gradients
    reach every adapter, also after a no_grad forward cached a bank of detached rows."""
    model = _lora_model([2, 2])
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, adapter_ids=[0, 1])
    for p in model.parameters():
        p.requires_grad_(False)
    factors = [m.B for m in (model.adapter_modules(n)["fc1"] for n in model.adapter_names)]
    for b in factors:
        b.requires_grad_(True)
    model(ids, adapter_ids=[0, 1]).square().sum().backward()
    assert all(b.grad is not None and b.grad.abs().sum() > 0 for b in factors)


def test_mixed_batch_after_changing_dtype() -> None:
    model = _lora_model([2, 3])
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, adapter_ids=[0, 1])
        model.to(torch.float64)
        got = model(ids, adapter_ids=[0, 1])
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, _per_adapter_reference(model, ids), atol=1e-9, rtol=0)


def test_batch_whose_rows_share_one_adapter_takes_the_single_adapter_path(monkeypatch) -> None:
    """Every row on adapter k: exactly the output of k active (no bank, no gather); every row -1: the base;
    a merged adapter still refuses adapter_ids."""
    model = _lora_model([2, 3])
    ids = torch.randint(0, 40, (4, 5), generator=torch.Generator().manual_seed(0))
    model.set_adapter("a1")
    with torch.no_grad():
        want = model(ids)
        with model.adapters_disabled():
            base = model(ids)
        layer = model.get_submodule("model.fc1")
        monkeypatch.setattr(type(layer), "_lowrank_bank", lambda self: pytest.fail("the bank was built"))
        torch.testing.assert_close(model(ids, adapter_ids=[1, 1, 1, 1]), want, atol=0, rtol=0)
        torch.testing.assert_close(model(ids, adapter_ids=[-1, -1, -1, -1]), base, atol=0, rtol=0)
        assert model.routing.call.shared_id is None  # reset after the call
        model.merge("a0", unload=False)
        with pytest.raises(pk.errors.AdapterIdsError, match="merged"):
            model(ids, adapter_ids=[0, 0, 0, 0])


def test_rename_adapter_keeps_modules_id_and_state(tmp_path) -> None:
    model = _lora_model([2, 3])
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(0))
    model.set_adapter("a1")
    with torch.no_grad():
        want, mixed = model(ids), model(ids, adapter_ids=[0, 1])
        module = model.adapter_modules("a1")["fc1"]
        model.rename_adapter("a1", "z")
        assert model.adapter_names == ["a0", "z"] and model.active_adapters == ["z"]
        assert model.adapter_modules("z")["fc1"] is module and "a1" not in model.configs
        torch.testing.assert_close(model(ids), want, atol=0, rtol=0)
        torch.testing.assert_close(model(ids, adapter_ids=[0, 1]), mixed, atol=1e-6, rtol=0)
        model.merge("z", unload=False)
        model.rename_adapter("z", "y")
        model.unmerge()  # the merged record moved with the name
        torch.testing.assert_close(model(ids), want, atol=1e-6, rtol=0)
    with pytest.raises(pk.errors.AdapterExistsError):
        model.rename_adapter("y", "a0")
    with pytest.raises(pk.errors.AdapterNameError):
        model.rename_adapter("y", "../x")
    with pytest.raises(pk.errors.AdapterNotFoundError):
        model.rename_adapter("nope", "x")
    model.save(tmp_path / "y", names="y")
    assert pk.load(make_tiny_net(), tmp_path / "y").configs["y"] == model.configs["y"]


def test_static_adapters_skip_the_version_check_until_released() -> None:
    """Under set_static_adapters an in-place write is not seen by the cached bank (the promise was broken);
    adding an adapter or releasing the promise brings every row up to date."""
    model = _lora_model([2, 2])
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(0))
    model.set_static_adapters()
    with torch.no_grad():
        before = model(ids, adapter_ids=[0, 1])
        model.adapter_modules("a0")["fc1"].B.mul_(2.0)
        torch.testing.assert_close(model(ids, adapter_ids=[0, 1]), before, atol=0, rtol=0)
        model.set_static_adapters(False)
        torch.testing.assert_close(
            model(ids, adapter_ids=[0, 1]), _per_adapter_reference(model, ids), atol=1e-6, rtol=0
        )
        model.set_static_adapters()
        model.adapter_modules("a1")["fc1"].B.mul_(3.0)
        model.add_adapter("a2", pk.LoRAConfig(r=2, targets=["fc1"], seed=2))  # the order changes: full check
        three = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(
            model(three, adapter_ids=[0, 1, 2]), _per_adapter_reference(model, three), atol=1e-6, rtol=0
        )
