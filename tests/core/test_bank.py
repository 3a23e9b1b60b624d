"""The mixed-batch bank: rows updated in place when adapters come, go or are renamed, rebuilt with gradients
or a new dtype, skipped when every row shares one adapter or the owner promised static adapters."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_net

import peftkit as pk


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
