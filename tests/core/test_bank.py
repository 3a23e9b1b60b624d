"""The mixed-batch bank: rows updated in place when adapters come, go or are renamed, rebuilt with gradients
or a new dtype, skipped when every row shares one adapter or the owner promised static adapters; run through
the C++ kernel (``peftkit/core/bgmv.py``) where it applies, with the same outputs as each row's adapter alone."""

from __future__ import annotations

import pytest
import torch
from _kernel_calls import count_kernel_calls
from conftest import make_tiny_net

import peftkit as pk
from peftkit.core import bank, bgmv


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


# ------------------------------------------------------------------------------ the C++ kernel (issue 19)
needs_kernel = pytest.mark.skipif(not bgmv.available(), reason=f"C++ kernel not built: {bgmv.status()}")


def _mlp_model(ranks: list[int]) -> pk.AdaptedModel:
    """Two Linear layers (24 -> 40 -> 24: widths that are not a multiple of the kernel's vector width), one LoRA
    adapter per rank, ``B`` non-zero."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.ReLU(), torch.nn.Linear(40, 24)).eval()
    model = pk.adapt(net, pk.LoRAConfig(r=ranks[0], alpha=4, targets=["0", "2"], seed=0), name="a0")
    for i, r in enumerate(ranks[1:], start=1):
        model.add_adapter(f"a{i}", pk.LoRAConfig(r=r, alpha=4, targets=["0", "2"], seed=i))
    for a in model.modules():
        if isinstance(a, pk.Adapter):
            torch.nn.init.normal_(a.B)
    return model.eval()


def _rowwise(model: pk.AdaptedModel, x: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Each row through its own adapter alone (id -1: the base model), stacked."""
    outs = []
    for i, k in enumerate(ids):
        if k < 0:
            with model.adapters_disabled():
                outs.append(model(x[i : i + 1]))
        else:
            model.set_adapter(model.adapter_names[k])
            outs.append(model(x[i : i + 1]))
    return torch.cat(outs)


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_batch_runs_through_the_kernel_and_equals_each_rows_adapter(monkeypatch, tokens, dtype) -> None:
    """One token per row (and three), adapters of ranks 1-16 (padded to 16 in the bank), rows of id -1 and of
    every adapter: the kernel runs (once per layer and call) and each row equals its adapter alone, to 1e-5 of the
    output in float32 and 1e-12 in float64; the gather path (kernel off) agrees too."""
    model = _mlp_model([1, 16, 4, 8, 2]).to(dtype)
    ids = [3, -1, 0, 1, 1, 4, 2, -1, 3, 3, 0, 1]
    shape = (len(ids), 24) if tokens == 1 else (len(ids), tokens, 24)
    x = torch.randn(shape, dtype=dtype)
    calls = count_kernel_calls(monkeypatch)
    with torch.no_grad():
        got = model(x, adapter_ids=ids)
        assert calls == [(len(ids) * tokens, len(ids))] * 2  # both layers, every token in one call
        monkeypatch.setattr(bank, "KERNEL", False)
        gathered = model(x, adapter_ids=ids)
        assert len(calls) == 2
        want = _rowwise(model, x, ids)
    tol = (1e-5 if dtype == torch.float32 else 1e-12) * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    torch.testing.assert_close(gathered, want, rtol=0, atol=tol)
    torch.testing.assert_close(got, gathered, rtol=0, atol=tol)


@needs_kernel
def test_kernel_follows_adapters_swapped_in_and_out(monkeypatch) -> None:
    """A server's bank: rows freed and reused by adapters of other ranks; the kernel reads each row only up to
    its current adapter's rank and stays exact."""
    model = _mlp_model([8, 2, 8])
    calls = count_kernel_calls(monkeypatch)
    x, ids = torch.randn(6, 24), [0, 1, 2, 2, 1, -1]
    with torch.no_grad():
        model(x, adapter_ids=ids)
        model.delete_adapter("a0")  # rank 8: its row is taken by a rank-3 adapter
        model.add_adapter("a9", pk.LoRAConfig(r=3, alpha=4, targets=["0", "2"], seed=9))
        for m in model.adapter_modules("a9").values():
            torch.nn.init.normal_(m.B)
        ids = [2, 1, 0, 0, 1, -1]
        got = model(x, adapter_ids=ids)
        want = _rowwise(model, x, ids)
    assert len(calls) == 4
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_gradients_of_a_mixed_batch_equal_the_per_adapter_forward(monkeypatch) -> None:
    """Training on a mixed batch: eval mode with gradients (the bank built from the live tensors) and training
    mode (each group through its adapter) give the inputs and every adapter the gradients of running each row
    through its own adapter's forward alone; the C++ kernel, which has no backward, is not used when gradients
    are wanted."""
    model = _mlp_model([2, 5, 3])
    ids = [1, 0, -1, 2, 1, 1]
    x = torch.randn(len(ids), 24)
    weights = torch.randn(len(ids), 24)
    calls = count_kernel_calls(monkeypatch)
    params = [p for n, p in model.named_parameters() if ".adapters." in n]
    for p in params:
        p.requires_grad_(True)

    def grads(run) -> list[torch.Tensor]:
        xi = x.clone().requires_grad_(True)
        (run(xi) * weights).sum().backward()
        out = [xi.grad.clone()] + [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        return out

    # each row alone through its adapter's own forward (a batch of one row: the single-adapter path)
    want = grads(lambda xi: torch.cat([model(xi[i : i + 1], adapter_ids=[k]) for i, k in enumerate(ids)]))
    assert all(w.abs().sum() > 0 for w in want)
    for train in (False, True):
        model.train(train)
        got = grads(lambda xi: model(xi, adapter_ids=ids))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5 * float(w.abs().max()))
    assert calls == []


@needs_kernel
def test_generate_with_adapter_ids_decodes_through_the_kernel(monkeypatch) -> None:
    """``generate(adapter_ids=...)``: the decode steps (one token per row) run through the kernel and every row
    decodes as with its adapter alone."""
    from conftest import tiny_gpt2

    model = pk.adapt(tiny_gpt2(), pk.LoRAConfig(r=4, targets=["c_attn", "c_fc"], seed=0), name="a")
    model.add_adapter("b", pk.LoRAConfig(r=2, targets=["c_attn"], seed=1))
    for m in model.modules():
        if isinstance(m, pk.Adapter):
            torch.nn.init.normal_(m.B, std=0.5)
    model.eval()
    prompts = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(0))
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    calls = count_kernel_calls(monkeypatch)
    out = model.generate(prompts, adapter_ids=["b", None, "a"], **kw)
    assert (3, 3) in calls  # a decode step: 3 rows of one token
    assert (15, 3) in calls  # the prompt: 3 rows of 5 tokens
    for row, name in enumerate(["b", None, "a"]):
        if name is None:
            with model.adapters_disabled():
                alone = model.generate(prompts[row : row + 1], **kw)
        else:
            model.set_adapter(name)
            alone = model.generate(prompts[row : row + 1], **kw)
        assert torch.equal(out[row : row + 1], alone), f"row {row} ({name})"


@needs_kernel
def test_compiled_model_runs_the_kernel_inside_its_graph() -> None:
    """``torch.compile`` of a model with mixed batches: the C++ op is captured in the compiled graphs (not left to
    eager code by a graph break) and the outputs equal the eager model's (symbolic batch sizes: test_bgmv.py)."""
    model = _mlp_model([2, 5, 3])
    ops: list[str] = []

    def recording(gm: torch.fx.GraphModule, inputs: list) -> object:
        ops.extend(str(node.target) for node in gm.graph.nodes if "peftkit" in str(node.target))
        return gm.forward

    compiled = torch.compile(model, backend=recording)
    with torch.no_grad():
        for ids in ([0, 2, -1, 1, 1, 0], [1, 0, 2, -1, 2, 2, 0, 1, 1]):
            x = torch.randn(len(ids), 24)
            want = model(x, adapter_ids=ids)
            torch.testing.assert_close(compiled(x, adapter_ids=ids), want, rtol=0, atol=1e-6 * float(want.abs().max()))
    assert any(op.split(".")[:2] == ["peftkit", "bgmv_"] for op in ops), ops
