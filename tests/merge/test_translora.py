"""``peftkit.merge.translora``: the Trans-LoRA pipeline on a toy task with tiny models (all built here)."""

from __future__ import annotations

import pytest
import torch
from _helpers import randomize
from conftest import make_tiny_net

import peftkit as pk
from peftkit.merge import MergeOptionError
from peftkit.merge.translora import SyntheticData, fit_discriminator, synthesize, trans_lora

CONFIG = dict(targets=["fc1", "fc2"], modules_to_save=["head"])


def _real(n: int, g: torch.Generator) -> torch.Tensor:
    """The task's inputs: 5 tokens from the first half of the vocabulary."""
    return torch.randint(0, 20, (n, 5), generator=g)


def _generate(n: int, g: torch.Generator) -> torch.Tensor:
    """The 'target model' proposing inputs: half in the task's domain, half from the other half of the vocabulary."""
    out = torch.randint(0, 20, (n, 5), generator=g)
    off = torch.rand(n, generator=g) < 0.5
    out[off] = torch.randint(20, 40, (int(off.sum()), 5), generator=g)
    return out


def _teacher() -> pk.AdaptedModel:
    """Source base + source task adapter (random values: the task is what it computes)."""
    model = pk.adapt(make_tiny_net(0), pk.LoRAConfig(r=4, **CONFIG), "task")
    randomize(model, "task", seed=11, scale=0.5)
    return model.eval()


def _ce(model, x, labels):
    return torch.nn.functional.cross_entropy(model(x), labels)


def _accuracy(model, x, labels) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == labels).float().mean())


def test_discriminator_filters_out_of_domain_candidates() -> None:
    g = torch.Generator().manual_seed(0)
    disc = pk.adapt(make_tiny_net(0), pk.LoRAConfig(r=4, **CONFIG), "disc")
    p_real = fit_discriminator(disc, "disc", _real(256, g), _generate(256, g), lambda m, x: m(x)[:, :2], steps=150)
    data = synthesize(_generate, p_real, count=100, per_round=64, seed=1)
    assert len(data.inputs) == data.kept == 100
    assert bool((data.inputs < 20).all())  # every kept candidate is in the task's domain
    assert 0.3 < data.acceptance < 0.7  # about the in-domain half of the candidates
    unfiltered = synthesize(_generate, None, count=100, seed=1)
    assert unfiltered.acceptance == pytest.approx(100 / 128) and not bool((unfiltered.inputs < 20).all())


def test_target_adapter_is_identity_at_init_and_uses_the_teachers_labels() -> None:
    teacher = _teacher()
    base = make_tiny_net(1).eval()
    x = _real(8, torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = base(x)
    target = pk.adapt(base, pk.LoRAConfig(r=2, **CONFIG), "other")
    data = SyntheticData(x, 8, 8)
    out = trans_lora(
        target, "moved", pk.LoRAConfig(r=4, **CONFIG), data, lambda v: teacher(v).argmax(-1), _ce, steps=2, lr=0.0
    )
    assert torch.equal(out.labels, teacher(x).argmax(-1))
    target.set_adapter("moved")
    with torch.no_grad():
        assert torch.equal(target(x), before)  # B = 0 and a zero head delta: the target base itself


def test_transfer_to_another_base_beats_the_target_base() -> None:
    teacher = _teacher()
    label = lambda v: teacher(v).argmax(-1)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    held_out = _real(512, torch.Generator().manual_seed(9))
    truth = label(held_out)
    disc = pk.adapt(make_tiny_net(0), pk.LoRAConfig(r=4, **CONFIG), "disc")
    p_real = fit_discriminator(disc, "disc", _real(256, g), _generate(256, g), lambda m, x: m(x)[:, :2], steps=150)
    results = {}
    for mode, filt in (("filtered", p_real), ("unfiltered", None)):
        target = pk.adapt(make_tiny_net(1), pk.LoRAConfig(r=4, **CONFIG), "scratch")
        with target.adapters_disabled():
            base_acc = _accuracy(target, held_out, truth)
        data = synthesize(_generate, filt, count=400, seed=3)
        out = trans_lora(target, "moved", pk.LoRAConfig(r=4, **CONFIG), data, label, _ce, steps=300, lr=1e-2)
        target.set_adapter("moved")
        results[mode] = (base_acc, _accuracy(target, held_out, truth), out.losses[0], out.losses[-1])
    # measured: base 0.145; filtered 0.824 (loss 1.13 -> 0.24); unfiltered (half the data off the task) 0.748
    base_acc, acc, first, last = results["filtered"]
    assert last < 0.5 * first
    assert acc > base_acc + 0.5 and acc > 0.75
    assert acc >= results["unfiltered"][1] + 0.03  # the discriminator's filter matters


def test_bad_requests() -> None:
    g = torch.Generator().manual_seed(0)
    with pytest.raises(MergeOptionError, match="count"):
        synthesize(_generate, None, count=0)
    with pytest.raises(MergeOptionError, match="threshold"):
        synthesize(_generate, None, count=1, threshold=1.0)
    disc = pk.adapt(make_tiny_net(0), pk.LoRAConfig(r=2, **CONFIG), "disc")
    with pytest.raises(MergeOptionError, match="one shape"):
        fit_discriminator(disc, "disc", _real(4, g), torch.zeros(4, 6, dtype=torch.long), lambda m, x: m(x)[:, :2])
    empty = SyntheticData(torch.zeros(0, 5, dtype=torch.long), 64, 0)
    with pytest.raises(MergeOptionError, match="no synthetic inputs"):
        trans_lora(disc, "t", pk.LoRAConfig(r=2, **CONFIG), empty, lambda v: v, _ce)
    assert "t" not in disc.adapter_names


def test_discriminator_scores_with_a_logits_fn_that_runs_other_rows_too() -> None:
    """``p_real`` hands ``logits`` the model with the discriminator active (as in training), so a ``logits`` that runs
    more rows than ``x`` in one pass (the transfer benchmark embeds its class prompts with the texts) scores; the
    model's active adapters are restored. (It used to call a proxy with ``adapter_ids`` for ``len(x)`` rows only.)"""
    g = torch.Generator().manual_seed(0)
    model = pk.adapt(make_tiny_net(0), pk.LoRAConfig(r=4, **CONFIG), "task")
    randomize(model, "task", seed=11, scale=0.5)  # the task adapter changes the output: scoring must not use it
    model.add_adapter("disc", pk.LoRAConfig(r=4, **CONFIG))
    anchors = _real(2, torch.Generator().manual_seed(5))

    def logits(m, x):
        out = m(torch.cat([x, anchors]))
        return out[: len(x), :2] - out[len(x) :, :2].mean(0)

    p_real = fit_discriminator(model, "disc", _real(64, g), _generate(64, g), logits, steps=20)
    x = _generate(16, torch.Generator().manual_seed(6))
    model.train()
    p = p_real(x)
    assert model.active_adapters == ["task"] and model.training  # restored
    model.set_adapter("disc")
    model.eval()
    with torch.no_grad():
        want = torch.softmax(logits(model, x), -1)[:, 1]
    torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7)
    model.set_adapter("task")
    with torch.no_grad():
        with_task = torch.softmax(logits(model, x), -1)[:, 1]
    assert float((p - with_task).abs().max()) > 0.05  # the task adapter active would score otherwise
