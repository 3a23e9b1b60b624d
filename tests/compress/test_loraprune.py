"""LoRAPrune: the importance from LoRA weights and gradients, the schedule, masked = physically pruned model."""

from __future__ import annotations

import itertools

import pytest
import torch

from peftkit.compress import arch, loraprune, structured
from peftkit.compress.errors import CompressOptionError, RatioError, UnknownArchitectureError
from tests.compress import _tiny


def _labelled(n=4):
    data = _tiny.batches(n=n)
    for b in data:
        b["labels"] = b["input_ids"]
    return data


def _trained_pruner(steps=6, layers=4, **kw):
    """An adapted tiny Llama after a few LoRA steps (B non-zero), with gradients present."""
    model = _tiny.llama(layers=layers)
    adapted = loraprune.adapt(model)
    pruner = loraprune.LoRAPrune(adapted, "loraprune", total_steps=steps, prune_freq=1, **kw)
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    adapted.train()
    data = _labelled()
    for step in range(1, steps + 1):
        opt.zero_grad()
        adapted(**data[step % len(data)]).loss.backward()
        pruner.step(step)
        opt.step()
    opt.zero_grad()
    adapted(**data[0]).loss.backward()
    return adapted, pruner


def test_estimated_gradient_is_the_change_of_ba_under_a_unit_step():
    torch.manual_seed(0)
    a, b, ga, gb = torch.randn(3, 7), torch.randn(5, 3), torch.randn(3, 7), torch.randn(5, 3)
    g = loraprune.estimated_gradient(a, b, ga, gb)
    torch.testing.assert_close(g, b @ a - (b - gb) @ (a - ga), rtol=0, atol=1e-6 * float(g.abs().max()))


def test_importance_equals_the_formula_from_lora_weights_and_gradients():
    adapted, pruner = _trained_pruner()
    i = pruner.blocks[0]
    scores = pruner.step_scores()[i]
    layout = pruner.layouts[i]
    heads = torch.zeros(layout.n_kv, dtype=torch.float64)
    for name in arch.ATTENTION:  # by hand: Ĝ, |Ĝ ⊙ (W + sBA)|, rows/cols, per kv group, L2-normalised, summed
        path = f"model.layers.{i}.self_attn.{name}"
        lora = adapted.adapter_modules("loraprune")[path]
        w = adapted.base_view(path).weight.detach().double()
        a, b = lora.A.detach().double(), lora.B.detach().double()
        ga, gb = lora.A.grad.double(), lora.B.grad.double()
        element = ((gb @ a + b @ ga - gb @ ga) * (w + lora.scale * b @ a)).abs()
        vec = element.sum(1) if name != "o_proj" else element.sum(0)
        vec = vec.reshape(layout.n_kv, -1).sum(1)
        heads += vec / (vec.norm() + 1e-8)
    torch.testing.assert_close(scores[0], heads, rtol=1e-5, atol=0)
    assert not any(adapted.base_view(p).weight.requires_grad for p in adapted.layer_paths["loraprune"])


def test_schedule_hits_both_ends_and_is_monotone():
    values = [loraprune.schedule(t, 100, 0.5) for t in range(0, 101)]
    assert values[0] == 0.0 and values[10] == 0.0 and values[91] == 0.5 and values[100] == 0.5
    assert all(b >= a for a, b in itertools.pairwise(values))


def test_masked_model_equals_the_physically_pruned_model_and_reaches_the_target():
    adapted, pruner = _trained_pruner(steps=8, layers=4, ratio=0.5)
    pruner.prune_to(0.5)
    assert pruner.blocks == [0, 1, 2]  # ⌊0.1·4⌋ = 0 first blocks are kept whole, and the last block
    ids = _tiny.batches(n=1, seed=7)[0]["input_ids"]
    adapted.eval()
    with torch.no_grad():
        masked = adapted(input_ids=ids).logits
    assert pruner.sparsity() == (0.5, 0.5)
    model = pruner.finalize()
    with torch.no_grad():
        pruned = model(input_ids=ids).logits
    torch.testing.assert_close(pruned, masked, rtol=0, atol=1e-5 * float(masked.abs().max()))
    for i in (0, 1, 2):
        block = model.model.layers[i]
        assert arch.unit_count(block) == (1, 24) and block.self_attn.q_proj.out_features == 16
    assert arch.unit_count(model.model.layers[3]) == (2, 48)
    assert not any("lora" in type(m).__name__.lower() for m in model.modules())


def test_loraprune_end_to_end_and_magnitude_baseline():
    model, losses = loraprune.loraprune(_tiny.llama(layers=4), _labelled(), ratio=0.5, steps=10, prune_freq=2)
    assert len(losses) == 10 and arch.unit_count(model.model.layers[1]) == (1, 24)
    base = _tiny.llama(layers=4)
    n_before = sum(p.numel() for p in base.parameters())
    plan = structured.magnitude_prune(base, 0.5)
    assert set(plan) == {0, 1, 2} and sum(p.numel() for p in base.parameters()) < n_before


def test_bad_input():
    adapted = loraprune.adapt(_tiny.llama())
    with pytest.raises(RatioError):
        loraprune.LoRAPrune(adapted, "loraprune", ratio=1.2, total_steps=10)
    with pytest.raises(CompressOptionError, match="metric"):
        loraprune.LoRAPrune(adapted, "loraprune", total_steps=10, metric="taylor")
    with pytest.raises(UnknownArchitectureError, match="q_proj"):
        loraprune.adapt(torch.nn.Sequential(torch.nn.Linear(3, 3)))
