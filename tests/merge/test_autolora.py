"""``peftkit.merge.autolora``: gated fusion identities, learned gates, weight-probe retrieval."""

from __future__ import annotations

import pytest
import torch
from _helpers import adapted
from conftest import make_tiny_net

import peftkit as pk
from peftkit.merge import MergeOptionError, merge_adapters
from peftkit.merge.autolora import GatedFusion, LoRARetriever, gated, layer_paths, weight_probe

TARGETS = ["fc1", "fc2"]


def _model(n: int = 2) -> pk.AdaptedModel:
    return adapted(make_tiny_net(), {f"l{i}": pk.LoRAConfig(r=2, alpha=4.0, targets=TARGETS) for i in range(n)})


def _x(rows: int = 4) -> torch.Tensor:
    return torch.randint(0, 40, (rows, 5), generator=torch.Generator().manual_seed(1))


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    a, b = a.detach(), b.detach()
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * float(b.abs().max()))


@torch.no_grad()
def test_gates_zero_one_and_constant_are_base_lora_and_merge() -> None:
    model = _model()
    names, paths = ["l0", "l1"], layer_paths(model, ["l0", "l1"])
    assert paths == TARGETS
    x = _x()
    with model.adapters_disabled():
        base = model(x)
    with gated(model, names, paths, torch.zeros(2, 2)):
        _close(model(x), base)
    with gated(model, ["l1"], paths, torch.ones(1, 2)):
        fused = model(x)
    model.set_adapter("l1")
    _close(fused, model(x))
    assert float((fused - base).abs().max()) > 1e-3  # the LoRA changes the output
    # constant gates per (LoRA, layer) = the merge sum_i g_il dW_il; here g the same on both layers
    merge_adapters(model, names, [0.3, 0.8], new_name="m", activate=False)
    model.set_adapter("m")
    with gated(model, names, paths, torch.tensor([[0.3, 0.3], [0.8, 0.8]])):
        fused = model(x)
    _close(fused, model(x))


@torch.no_grad()
def test_per_row_gates_route_rows() -> None:
    model = _model()
    names, paths = ["l0", "l1"], TARGETS
    x = _x()
    gates = torch.zeros(4, 2, 2)
    gates[:2, 0] = 1.0  # rows 0-1: l0 only; rows 2-3: l1 only
    gates[2:, 1] = 1.0
    with gated(model, names, paths, gates):
        fused = model(x)
    _close(fused, model(x, adapter_ids=["l0", "l0", "l1", "l1"]))
    # a layer-wise gate: l0 on fc1 only
    with gated(model, ["l0"], paths, torch.tensor([[1.0, 0.0]])):
        fc1_only = model(x)
    model.set_adapter("l0")
    layer = model.adapted_layer("fc2")
    layer.adapters["l0"].B.zero_()
    _close(fc1_only, model(x))


def test_gate_network_shape_init_and_learning() -> None:
    model = _model()
    fusion = GatedFusion.for_model(model, ["l0", "l1"], prompt_dim=4)
    t = torch.tensor([10, 900, 300])
    gates = fusion(t, torch.zeros(3, 4))
    assert gates.shape == (3, 2, 2) and torch.equal(gates, torch.full((3, 2, 2), 0.5))
    # target: l0 for early (small t) rows, l1 for late rows; the gates must learn the timestep dependence
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(4):
        x, t = torch.randint(0, 40, (16, 5), generator=g), torch.randint(0, 1000, (16,), generator=g)
        with torch.no_grad():
            y = model(x, adapter_ids=["l0" if v < 500 else "l1" for v in t])
        batches.append((x, t, y))

    def loss_fn(model, batch, fusion):
        x, t, y = batch
        out = fusion.run(model, t, torch.zeros(len(t), 4), lambda: model(x))
        return torch.nn.functional.mse_loss(out, y)

    before = {n: p.clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    losses = fusion.fit(model, batches, loss_fn, steps=300, lr=1e-2)
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # base and LoRAs frozen
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():
        early, late = fusion(torch.tensor([100, 900]), torch.zeros(2, 4))
    # each phase's LoRA gets the larger gates, on both layers (the layers interact, so not exactly 1 and 0)
    assert float(early[0].min()) > 0.75 > 0.35 > float(early[1].max())
    assert float(late[1].min()) > 0.75 > 0.45 > float(late[0].max())


def test_retriever_finds_held_out_loras_by_caption() -> None:
    model = _model(32)
    names, paths = model.adapter_names, TARGETS
    feats = torch.stack([weight_probe(model, n, paths) for n in names])
    assert feats.shape == (32, 2 * 8 * 4)
    # synthetic captions: a fixed linear "description" of each LoRA's weights plus noise (known pairs)
    g = torch.Generator().manual_seed(4)
    mix = torch.randn(24, feats.shape[1], generator=g)
    captions = feats @ mix.T / feats.std() + 0.1 * torch.randn(32, 24, generator=g)
    retriever = LoRARetriever.fit(feats[:24], captions[:24], steps=300, seed=0)
    held = range(24, 32)
    hits = [int(retriever.retrieve(captions[i], feats[24:], k=1)[0][0]) + 24 == i for i in held]
    hits3 = [i - 24 in retriever.retrieve(captions[i], feats[24:], k=3)[0].tolist() for i in held]
    assert sum(hits) >= 6 and all(hits3), (hits, hits3)  # chance: 1/8 and 3/8


def test_bad_requests() -> None:
    model = _model()
    with pytest.raises(MergeOptionError, match="gates must be"):
        with gated(model, ["l0", "l1"], TARGETS, torch.ones(2, 3)):
            pass
    with pytest.raises(MergeOptionError, match=">= 2 matching rows"):
        LoRARetriever.fit(torch.randn(3, 8), torch.randn(2, 4))
    r = LoRARetriever.fit(torch.randn(3, 8), torch.randn(3, 4), steps=1)
    with pytest.raises(MergeOptionError, match="k must be"):
        r.retrieve(torch.randn(4), torch.randn(3, 8), k=4)
    with pytest.raises(pk.errors.AdapterNotFoundError):
        GatedFusion.for_model(model, ["nope"], prompt_dim=2)
