"""DyLoRA spec properties: truncated forward == rank-k LoRA, frozen-mode gradients on component b only,
merge per rank, one rank shared by all layers, mixed batches with per-adapter eval ranks."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_net
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.methods.dylora import DyLoRA, DyLoRAConfig, sample_rank, set_rank
from peftkit.methods.lora import LoRA, LoRAConfig


def _adapter(r: int = 4, **kw) -> tuple[DyLoRA, BaseView, nn.Linear]:
    torch.manual_seed(0)
    lin = nn.Linear(10, 6)
    base = BaseView(lin)
    a = DyLoRA(base, DyLoRAConfig(r=r, alpha=8.0, **kw))
    with torch.no_grad():
        a.B.normal_()
    return a, base, lin


@pytest.mark.parametrize("k", [1, 2, 4])
def test_truncated_equals_rank_k_lora(k: int) -> None:
    a, base, lin = _adapter()
    a.eval().set_rank(k)
    lora = LoRA(base, LoRAConfig(r=k, alpha=8.0))
    with torch.no_grad():
        lora.A.copy_(a.A[:k])
        lora.B.copy_(a.B[:, :k])
    x = torch.randn(3, 5, 10)
    torch.testing.assert_close(a(x, lin(x), base), lora(x, lin(x), base), atol=1e-6, rtol=0)
    merged = nn.functional.linear(x, lin.weight + a.delta_weight(base), lin.bias)
    torch.testing.assert_close(merged, a(x, lin(x), base), atol=1e-5, rtol=0)
    lr = a.lowrank(base)
    assert lr.down.shape[0] == k and lr.scale == 8.0 / k


def test_identity_at_init() -> None:
    lin = nn.Linear(10, 6)
    base = BaseView(lin)
    a = DyLoRA(base, DyLoRAConfig(r=4))
    x = torch.randn(2, 10)
    for k in range(1, 5):
        a.set_rank(k)
        assert torch.equal(a(x, lin(x), base), lin(x))


def test_frozen_mode_gradient_only_on_component_b() -> None:
    a, base, lin = _adapter(r=4)
    a.train().set_train_rank(3)  # b = 2
    x = torch.randn(4, 10)
    a(x, lin(x), base).pow(2).sum().backward()
    assert (a.A.grad[:2] == 0).all() and (a.A.grad[3:] == 0).all() and (a.A.grad[2] != 0).any()
    assert (a.B.grad[:, :2] == 0).all() and (a.B.grad[:, 3:] == 0).all() and (a.B.grad[:, 2] != 0).any()


def test_update_all_below_trains_every_component_below_k() -> None:
    a, base, lin = _adapter(r=4, update_all_below=True)
    a.train().set_train_rank(3)
    x = torch.randn(4, 10)
    a(x, lin(x), base).pow(2).sum().backward()
    assert (a.A.grad[:3].abs().sum(1) > 0).all() and (a.A.grad[3:] == 0).all()


def test_train_and_eval_ranks_are_separate() -> None:
    a, base, lin = _adapter(r=4)
    a.set_train_rank(1)
    a.set_rank(4)
    x = torch.randn(2, 10)
    a.train()
    y_train = a(x, lin(x), base)
    a.eval()
    assert a.rank == 4 and not torch.allclose(y_train, a(x, lin(x), base))
    with pytest.raises(ValueError):
        a.set_rank(5)
    with pytest.raises(pk.errors.InvalidConfigError):
        DyLoRAConfig(r=4, eval_rank=0)


def test_one_rank_shared_by_all_layers() -> None:
    model = pk.adapt(make_tiny_net(), DyLoRAConfig(r=4, targets=["fc1", "fc2"], seed=3))
    mods = list(model.adapter_modules("default").values())
    seen = set()
    for step in range(1, 30):
        model.step_adapters(step)
        assert len({m.train_rank for m in mods}) == 1
        seen.add(mods[0].train_rank)
    assert seen == {1, 2, 3, 4}
    g = torch.Generator().manual_seed(0)
    k = sample_rank(model, g)
    assert all(m.train_rank == k for m in mods)
    assert k == int(torch.randint(4, (1,), generator=torch.Generator().manual_seed(0))) + 1
    set_rank(model, 2)
    assert all(m.lowrank(None).down.shape[0] == 2 for m in mods)


def test_mixed_batch_uses_each_adapters_eval_rank() -> None:
    model = pk.adapt(make_tiny_net(), DyLoRAConfig(r=4, targets=["fc1", "fc2"], seed=0), name="a").eval()
    model.add_adapter("b", DyLoRAConfig(r=4, targets=["fc1", "fc2"], seed=1))
    with torch.no_grad():
        for name in "ab":
            for m in model.adapter_modules(name).values():
                m.B.normal_()
    ids = torch.randint(0, 40, (3, 5))
    with torch.no_grad():
        model(input_ids=ids, adapter_ids=torch.tensor([0, 1, -1]))  # build and cache the bank
        for m in model.adapter_modules("b").values():
            m.set_rank(1)  # must invalidate the cached bank
        mixed = model(input_ids=ids, adapter_ids=torch.tensor([0, 1, -1]))
        model.set_adapter("b")
        only_b = model(input_ids=ids)
    torch.testing.assert_close(mixed[1], only_b[1], atol=1e-5, rtol=0)


def test_set_rank_is_saved_and_reloaded(tmp_path) -> None:
    """Issue 12 item 14: a rank chosen with set_rank is part of the saved adapter; the reloaded adapter runs,
    merges and reports at that rank, also when it is moved (``.to``) before its first forward."""
    model = pk.adapt(make_tiny_net(), DyLoRAConfig(r=4, targets=["fc1", "fc2"], seed=0)).eval()
    with torch.no_grad():
        for m in model.adapter_modules("default").values():
            m.B.normal_()
    ids = torch.randint(0, 40, (4, 5), generator=torch.Generator().manual_seed(1))
    set_rank(model, 1)
    with torch.no_grad():
        want = model(input_ids=ids)
        full_rank = model.adapter_modules("default")["fc1"].delta_weight(None).clone()
    model.save(tmp_path / "dy")
    loaded = pk.load(make_tiny_net(), tmp_path / "dy").eval()
    mods = loaded.adapter_modules("default")
    assert all(m.effective_rank() == 1 and m.lowrank(None).down.shape[0] == 1 for m in mods.values())
    with torch.no_grad():
        got = loaded(input_ids=ids)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(want.abs().max()))
    torch.testing.assert_close(mods["fc1"].delta_weight(None), full_rank, rtol=0, atol=0)
    plain = loaded.merge()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids), want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_load_state_dict_carries_the_eval_rank() -> None:
    a, base, lin = _adapter(r=4)
    a.eval().set_rank(2)
    b, _, _ = _adapter(r=4)
    b.eval()
    assert b.rank == 4
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 10)
    assert b.rank == 2 and torch.equal(b(x, lin(x), base), a(x, lin(x), base))


def test_eval_rank_follows_a_replaced_buffer() -> None:
    """The int cache of the eval rank is re-read when the buffer is written or replaced (``.to(device)`` makes a
    new tensor whose version restarts at 0, which can equal the cached version)."""
    a, base, _ = _adapter(r=4)
    a.eval()
    assert a.rank == 4  # cached at version 0
    a.eval_rank.copy_(torch.tensor(2))  # written as loading writes it (version 1), no forward in between
    a.eval_rank = a.eval_rank.clone()  # replaced as .to(device) replaces it: a new tensor at version 0
    assert a.rank == 2 and a.lowrank(base).down.shape[0] == 2


def test_step_semantics_documented_draws() -> None:
    """``step(s)`` draws the rank of the update after ``s`` updates from ``(seed, s)``: step(0) draws the first."""
    a, _, _ = _adapter(r=4, seed=7)
    for s in (0, 1, 5):
        a.step(s)
        g = torch.Generator().manual_seed(7 * 1_000_003 + s)
        assert a.train_rank == int(torch.randint(4, (1,), generator=g)) + 1


def test_files_saved_without_the_eval_rank_still_load() -> None:
    """Adapters saved before the eval rank was saved (no ``eval_rank`` tensors) load through the same path as
    ``pk.load`` (``skip_init`` + ``assign_tensors``) at the config's eval rank."""
    from peftkit.core.protocol import skip_init

    config = DyLoRAConfig(r=4, eval_rank=3, targets=["fc1", "fc2"], seed=0)
    model = pk.adapt(make_tiny_net(), config).eval()
    with torch.no_grad():
        for m in model.adapter_modules("default").values():
            m.B.normal_()
    old_file = {k: t for k, t in model.adapter_state_dict("default").items() if not k.endswith("eval_rank")}
    assert len(old_file) == 4
    loaded = pk.AdaptedModel(make_tiny_net())
    with skip_init():
        loaded.add_adapter("default", config)
    loaded.assign_tensors("default", old_file, source="old file")
    loaded.eval()
    ids = torch.randint(0, 40, (4, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids), model(input_ids=ids), rtol=0, atol=0)
    assert all(m.effective_rank() == 3 for m in loaded.adapter_modules("default").values())


class _Wrapper(nn.Module):  # as DDP holds a model: under .module
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_set_rank_covers_every_adapter_and_sample_rank_the_trained_ones() -> None:
    """set_rank sets every DyLoRA module of the model (all adapters, also through a wrapper); sample_rank sets
    the modules that train (the active adapter's) and leaves the others."""
    model = pk.adapt(make_tiny_net(), DyLoRAConfig(r=4, targets=["fc1", "fc2"], seed=3))
    model.add_adapter("b", DyLoRAConfig(r=3, targets=["fc1"], seed=4))
    set_rank(_Wrapper(model), 2)
    mods = [*model.adapter_modules("default").values(), *model.adapter_modules("b").values()]
    assert [m.effective_rank() for m in mods] == [2, 2, 2]
    b_rank = model.adapter_modules("b")["fc1"].train_rank  # r = 3: the seed below draws k = 2
    k = sample_rank(_Wrapper(model), torch.Generator().manual_seed(1))
    assert all(m.train_rank == k for m in model.adapter_modules("default").values())
    assert model.adapter_modules("b")["fc1"].train_rank == b_rank
    with pytest.raises(ValueError, match="no DyLoRA adapter"):
        set_rank(pk.adapt(make_tiny_net(), pk.get_config("lora", r=2, targets=["fc1"])), 1)
