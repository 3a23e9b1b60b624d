"""SHiRA spec properties (n = r(d_in+d_out) trainable, exact n ones, seeded masks, sparsity of the update
after training, rank above r, exact merge) and parity with PEFT's ``ShiraConfig``."""

from __future__ import annotations

import copy

import pytest
import torch
from _structured_parity import assert_grad_parity, assert_parity, fill, on_linear, peft_model
from conftest import make_tiny_net, tiny_bert, tiny_gpt2
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.errors import InvalidConfigError
from peftkit.init.shira import SHiRAGradientMask, shira_gradient_masks
from peftkit.methods.shira import MaskNotCalibratedError, SHiRA, SHiRAConfig, random_mask


def _adapter(**kw: object) -> tuple[SHiRA, BaseView, nn.Linear]:
    return on_linear(SHiRA, SHiRAConfig(**kw))


def test_count_mask_and_sorted_indices() -> None:
    a, base, _ = _adapter(r=2, random_seed=3)
    n = 2 * (24 + 20)
    assert a.values.numel() == n == SHiRA.expected_trainable(base, a.config)
    assert a.indices.shape == (2, n) and a.indices.dtype == torch.int32
    mask = random_mask(20, 24, n, 3)
    assert int(mask.sum()) == n
    rows, cols = torch.where(mask)
    assert torch.equal(a.indices.long(), torch.stack([rows, cols]))  # row-major sorted, as PEFT
    flat = a.indices[0].long() * 24 + a.indices[1].long()
    assert torch.equal(flat, flat.unique())  # distinct and sorted


def test_same_seed_same_mask_other_seed_other_mask() -> None:
    a, _, _ = _adapter(r=2, random_seed=3)
    b, _, _ = _adapter(r=2, random_seed=3)
    c, _, _ = _adapter(r=2, random_seed=4)
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    # random_seed=None falls back to the config's seed
    d, _, _ = _adapter(r=2, seed=3)
    assert torch.equal(a.indices, d.indices)


def test_magnitude_mask_takes_largest_weights() -> None:
    a, _, lin = _adapter(r=1, mask_type="magnitude")
    n = 44
    chosen = lin.weight.abs()[a.indices[0].long(), a.indices[1].long()]
    rest = lin.weight.abs().flatten().sort(descending=True).values
    assert chosen.min() >= rest[n - 1] and chosen.numel() == n


def test_too_large_r_raises() -> None:
    with pytest.raises(InvalidConfigError, match="more than"):
        _adapter(r=20)


def test_update_stays_on_mask_after_training_and_grad_only_on_values() -> None:
    model = pk.adapt(make_tiny_net(), SHiRAConfig(r=1, targets=["fc1", "fc2"], random_seed=0))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randint(0, 40, (4, 5))
    model(x).pow(2).mean().backward()
    assert all(not p.requires_grad or n.endswith("values") for n, p in model.named_parameters())
    opt.step()
    for path, a in model.adapter_modules("default").items():
        layer = model.get_submodule(f"model.{path}")
        d = a.delta_weight(layer.base)
        mask = torch.zeros_like(d, dtype=torch.bool)
        mask[a.indices[0].long(), a.indices[1].long()] = True
        assert torch.count_nonzero(d[~mask]) == 0 and torch.count_nonzero(d[mask]) > 0


def test_rank_exceeds_r_and_merge_exact() -> None:
    a, base, lin = _adapter(r=1, init="randn")
    d = a.delta_weight(base)
    assert torch.linalg.matrix_rank(d).item() > 1
    x = torch.randn(5, 24)
    with torch.no_grad():
        torch.testing.assert_close(a(x, lin(x), base), nn.functional.linear(x, lin.weight + d, lin.bias))
        torch.testing.assert_close(a(x, lin(x), base), lin(x) + x @ d.T, atol=1e-5, rtol=1e-5)


def test_indices_saved_so_reload_is_exact(tmp_path) -> None:
    model = pk.adapt(make_tiny_net(), SHiRAConfig(r=1, targets=["fc1"], random_seed=1), name="a")
    a = model.adapter_modules("a")["fc1"]
    with torch.no_grad():
        a.values.normal_()
        a.indices.copy_(a.indices.flip(1))  # any stored mask (a custom one, say) reloads as saved
    model.save(tmp_path / "s")
    loaded = pk.load(make_tiny_net(), tmp_path / "s")
    assert torch.equal(loaded.adapter_modules("a")["fc1"].indices, a.indices)


CASES = {
    "bert": (tiny_bert, dict(r=2, target_modules=["query", "value", "dense"], random_seed=42)),
    "net": (make_tiny_net, dict(r=1, target_modules=["fc1", "fc2"], random_seed=7)),
}


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_parity(case: str) -> None:
    peft = pytest.importorskip("peft")
    factory, kw = CASES[case]
    base = factory()
    pm = peft_model(base, peft.ShiraConfig(**kw))
    fill(pm, "shira_")
    ours = pk.adapt(base, SHiRAConfig(r=kw["r"], targets=kw["target_modules"], random_seed=kw["random_seed"]), name="a")
    copied = 0
    with torch.no_grad():
        for path, a in ours.adapter_modules("a").items():
            layer = pm.get_submodule(f"base_model.model.{path}")
            assert torch.equal(a.indices.cpu(), layer.shira_indices["default"].cpu())  # same mask from the seed
            a.values.copy_(layer.shira_weight["default"])
            copied += 1
    assert copied == sum(1 for n, _ in pm.named_parameters() if "shira_" in n)
    vocab = 40 if factory is make_tiny_net else 64
    x = torch.randint(0, vocab, (3, 6), generator=torch.Generator().manual_seed(1))
    assert_parity(pm, ours, x)
    assert_grad_parity(pm, ours, x, "shira_", rename=lambda n: "weight")


# ------------------------------------------------------------------ gradient-based masks (SHiRA-Grad / SNIP)
def _calibration(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (4, 6), generator=g) for _ in range(3)]


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    out = model(batch)
    return (out if isinstance(out, torch.Tensor) else out.logits).pow(2).mean()


def _base_grads(net: nn.Module, paths: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """∇W of the summed calibration loss on a plain copy of the base (training mode, as the calibration pass),
    in canonical [out, in] layout."""
    net = copy.deepcopy(net).train()
    weights = {p: net.get_submodule(p).weight for p in paths}
    total = sum(_loss(net, b) for b in batches)
    grads = torch.autograd.grad(total, list(weights.values()))
    return {p: g if isinstance(net.get_submodule(p), nn.Linear) else g.T for p, g in zip(weights, grads)}


@pytest.mark.parametrize("mask_type", ["gradient", "snip"])
@pytest.mark.parametrize("factory", [make_tiny_net, tiny_gpt2], ids=["linear", "gpt2-conv1d"])
def test_gradient_masks_take_top_calibration_scores(mask_type: str, factory) -> None:
    net = factory()
    for m in net.modules():  # the calibration pass runs in training mode: no dropout, so the gradients are exact
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    paths = ["fc1", "fc2"] if factory is make_tiny_net else ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    batches = _calibration(40 if factory is make_tiny_net else 64)
    expected_grads = _base_grads(net, paths, batches)
    model = pk.adapt(net, SHiRAConfig(r=1, targets=paths, mask_type=mask_type), name="g")
    with pytest.raises(MaskNotCalibratedError, match="shira_gradient_masks"):
        model(batches[0])
    chosen = shira_gradient_masks(model, batches, _loss)
    assert sorted(chosen) == sorted(paths)
    for path, a in model.adapter_modules("g").items():
        view = model.model.get_submodule(path).base
        g = expected_grads[path]
        score = g.abs() if mask_type == "gradient" else (view.weight.detach() * g).abs()
        picked = score[a.indices[0].long(), a.indices[1].long()]
        n = a.values.numel()
        assert n == view.in_features + view.out_features
        assert picked.min() >= score.flatten().sort(descending=True).values[n - 1] * (1 - 1e-5)
        flat = a.indices[0].long() * view.in_features + a.indices[1].long()
        assert torch.equal(flat, flat.unique())  # distinct, row-major sorted (as PEFT stores them)
        assert torch.count_nonzero(a.values) == 0
    assert all(not p.requires_grad and p.grad is None for n, p in model.model.named_parameters() if "values" not in n)


def test_gradient_mask_initialiser_trains_on_its_entries_and_reloads_without_calibration(tmp_path) -> None:
    batches = _calibration(40)
    init = SHiRAGradientMask(batches, _loss, score="snip")
    model = pk.adapt(make_tiny_net(), SHiRAConfig(r=1, targets=["fc1", "fc2"]), name="g", init=init)
    assert model.configs["g"].mask_type == "snip"  # recorded in the saved config
    same = pk.adapt(make_tiny_net(), SHiRAConfig(r=1, targets=["fc1", "fc2"], mask_type="snip"), name="g")
    shira_gradient_masks(same, batches, _loss)  # the function the initialiser runs
    for path, a in model.adapter_modules("g").items():
        assert torch.equal(a.indices, same.adapter_modules("g")[path].indices)
    with torch.no_grad():
        torch.testing.assert_close(model(batches[0]), make_tiny_net()(batches[0]))  # values start at zero
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _loss(model, batches[0]).backward()
    opt.step()
    for path, a in model.adapter_modules("g").items():
        d = a.delta_weight(model.model.get_submodule(path).base)
        mask = torch.zeros_like(d, dtype=torch.bool)
        mask[a.indices[0].long(), a.indices[1].long()] = True
        assert torch.count_nonzero(d[~mask]) == 0 and torch.count_nonzero(d[mask]) > 0
    model.save(tmp_path / "g")
    loaded = pk.load(make_tiny_net(), tmp_path / "g")  # the saved indices are the calibrated mask
    for path, a in loaded.adapter_modules("g").items():
        assert torch.equal(a.indices, model.adapter_modules("g")[path].indices)
    with torch.no_grad():
        torch.testing.assert_close(loaded(batches[1]), model(batches[1]))


def test_gradient_mask_errors() -> None:
    random_model = pk.adapt(make_tiny_net(), SHiRAConfig(r=1, targets=["fc1"]))
    with pytest.raises(InvalidConfigError, match="nothing to calibrate"):
        shira_gradient_masks(random_model, _calibration(40), _loss)
    model = pk.adapt(make_tiny_net(), SHiRAConfig(r=1, targets=["fc1"], mask_type="snip"))
    with pytest.raises(InvalidConfigError, match="at least one calibration batch"):
        shira_gradient_masks(model, [], _loss)
    with pytest.raises(InvalidConfigError, match="mask_type must be one of"):
        SHiRAConfig(mask_type="grad")
    with pytest.raises(InvalidConfigError, match="score must be one of"):
        SHiRAGradientMask([], score="grad")
    with pytest.raises(InvalidConfigError, match="initialises a SHiRA adapter"):
        pk.adapt(make_tiny_net(), pk.get_config("lora", targets=["fc1"]), init=SHiRAGradientMask(_calibration(40)))
    a = model.adapter_modules("default")["fc1"]
    with pytest.raises(InvalidConfigError, match="exactly 48 ones"):
        a.set_mask(torch.ones(32, 16, dtype=torch.bool))


@pytest.mark.parametrize("mask_type", ["random", "magnitude", "gradient"])
def test_adapter_is_indices_and_values_so_switching_is_a_scatter(mask_type: str) -> None:
    """Only ``indices`` and ``values`` are saved, and applying / switching an adapter changes exactly its n
    entries of W (a scatter), for every mask type."""
    net = make_tiny_net()
    base_w = net.fc1.weight.detach().clone()
    model = pk.adapt(net, SHiRAConfig(r=1, targets=["fc1"], mask_type=mask_type, random_seed=1), name="a")
    if mask_type == "gradient":
        shira_gradient_masks(model, _calibration(40), _loss)
    model.add_adapter("b", SHiRAConfig(r=1, targets=["fc1"], random_seed=2, init="randn"))
    for name in ("a", "b"):
        a = model.adapter_modules(name)["fc1"]
        assert set(a.state_dict()) == {"indices", "values"} and a.indices.shape == (2, 48)
        with torch.no_grad():
            a.values.normal_()
    for name in ("a", "b"):
        model.set_adapter(name)
        before = model.model.fc1.base.weight.detach().clone()
        model.merge(unload=False)
        a = model.adapter_modules(name)["fc1"]
        changed = (model.model.fc1.base.weight != before).nonzero().T
        assert torch.equal(changed, a.indices.long())  # exactly its entries (values are nonzero, sorted order)
        model.unmerge()
        restored = model.model.fc1.base.weight.detach()
        torch.testing.assert_close(restored, base_w, atol=1e-6, rtol=0)  # W + d - d, rounded on the n entries
        off = torch.ones_like(base_w, dtype=torch.bool)
        off[a.indices[0].long(), a.indices[1].long()] = False
        assert torch.equal(restored[off], before[off])


def test_merge_writes_only_the_masked_entries_on_conv1d() -> None:
    """Merge goes through ``sparse_delta``: the layer records entries, not a dense ΔW, and on GPT-2's
    transposed Conv1D storage the right entries change; merged == unmerged, unmerge restores."""
    model = pk.adapt(tiny_gpt2(), SHiRAConfig(r=1, targets=["c_attn"], random_seed=3)).eval()
    for a in model.adapter_modules("default").values():
        with torch.no_grad():
            a.values.normal_()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        layer = model.model.get_submodule("transformer.h.0.attn.c_attn")
        before = layer.base.weight.detach().clone()  # canonical [out, in] view
        model.merge(unload=False)
        delta, _ = layer.merged["default"]
        assert isinstance(delta, pk.core.protocol.SparseDelta)
        a = model.adapter_modules("default")["transformer.h.0.attn.c_attn"]
        changed = (layer.base.weight != before).nonzero().T
        assert torch.equal(changed, a.indices.long())
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-5, rtol=0)
        model.unmerge()
        torch.testing.assert_close(layer.base.weight, before, atol=1e-6, rtol=0)
