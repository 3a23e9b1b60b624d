"""``peftkit.merge.composition``: LoRA Switch / Composite / Merge on a small UNet-like denoiser built here."""

from __future__ import annotations

import math

import pytest
import torch
from _denoiser import unet_with_loras

from peftkit.errors import AdapterNotFoundError
from peftkit.merge import MergeOptionError
from peftkit.merge.composition import (
    DDIM,
    Guidance,
    guided_predictions,
    lora_composite,
    lora_merge,
    lora_switch,
    sample,
    switch_index,
)

ROWS = 3


def _inputs(seed: int = 7) -> tuple[torch.Tensor, Guidance]:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(ROWS, 1, 8, 8, generator=g)
    return noise, Guidance(cond=torch.tensor([0, 1, 2]), uncond=torch.full((ROWS,), 4), scale=3.0)


def _reference(model, noise, guidance, active, sampler) -> torch.Tensor:
    """Plain CFG sampling with ``active(step)`` set as the model's active adapters (no adapter_ids)."""

    def predict(x, t, i):
        model.set_adapter(active(i))
        ts = torch.full((2 * ROWS,), int(t))
        eps = model(torch.cat([x, x]), ts, torch.cat([guidance.uncond, guidance.cond]))
        return eps[:ROWS] + guidance.scale * (eps[ROWS:] - eps[:ROWS])

    return sample(model, noise, predict, sampler)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    a, b = a.detach(), b.detach()
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * float(b.abs().max()))


def test_ddim_with_the_true_noise_recovers_x0() -> None:
    sampler = DDIM(steps=10)
    x0 = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x0)
    a = float(sampler.alpha_bar[sampler.timesteps[0]])
    x = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    for i, t in enumerate(sampler.timesteps):
        ab = float(sampler.alpha_bar[t])
        x = sampler.step(x, (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab), i)
    torch.testing.assert_close(x, x0, rtol=1e-9, atol=1e-9)


def test_switch_index_follows_the_official_callback() -> None:
    # tau=5, 3 LoRAs: step 0 and 1..5 -> 0 (the first LoRA runs tau+1 steps), 6..10 -> 1, 11..15 -> 2, 16.. -> 0
    got = [switch_index(t, 3, 5) for t in range(18)]
    assert got == [0] * 6 + [1] * 5 + [2] * 5 + [0] * 2


def test_switch_with_one_lora_is_that_lora_bitwise() -> None:
    model = unet_with_loras(2)
    noise, guidance = _inputs()
    out = lora_switch(model, ["c1"], noise, guidance, sampler=DDIM(steps=8))
    ref = _reference(model, noise, guidance, lambda i: "c1", DDIM(steps=8))
    assert torch.equal(out.samples, ref)
    assert out.passes == {"c1": 8} and out.steps == [["c1"]] * 8


def test_switch_uses_the_scheduled_lora_at_each_step() -> None:
    model = unet_with_loras(3)
    noise, guidance = _inputs()
    model.set_adapter("c2")
    out = lora_switch(model, ["c0", "c1", "c2"], noise, guidance, switch_step=2, sampler=DDIM(steps=9))
    assert model.active_adapters == ["c2"]  # routing by adapter_ids: the active set is untouched
    names = ["c0", "c1", "c2"]
    assert [s[0] for s in out.steps] == [names[switch_index(i, 3, 2)] for i in range(9)]
    assert out.passes == {"c0": 5, "c1": 2, "c2": 2}  # steps 0-2 and 7-8, 3-4, 5-6
    ref = _reference(model, noise, guidance, lambda i: names[switch_index(i, 3, 2)], DDIM(steps=9))
    _close(out.samples, ref)
    # and it is not what a single LoRA gives (the schedule matters)
    single = _reference(model, noise, guidance, lambda i: "c0", DDIM(steps=9))
    assert float((out.samples - single).abs().max()) > 1e-3


def test_composite_averages_each_loras_guidance_branches() -> None:
    model = unet_with_loras(3)
    noise, guidance = _inputs()
    t = torch.tensor(500)
    preds = guided_predictions(model, ["c0", "c1", "c2"], noise, t, guidance)
    for name, (eps_u, eps_c) in zip(["c0", "c1", "c2"], preds):
        model.set_adapter(name)
        ts = torch.full((ROWS,), 500)
        _close(eps_u, model(noise, ts, guidance.uncond))
        _close(eps_c, model(noise, ts, guidance.cond))
    # a whole composite run = the mean of the per-LoRA guided predictions at every step
    names = ["c0", "c1", "c2"]

    def mean_predict(x, t, i):
        u = c = 0
        for n in names:
            model.set_adapter(n)
            ts = torch.full((ROWS,), int(t))
            u, c = u + model(x, ts, guidance.uncond) / 3, c + model(x, ts, guidance.cond) / 3
        return u + guidance.scale * (c - u)

    out = lora_composite(model, names, noise, guidance, sampler=DDIM(steps=6))
    _close(out.samples, sample(model, noise, mean_predict, DDIM(steps=6)))
    unbatched = lora_composite(model, names, noise, guidance, batched=False, sampler=DDIM(steps=6))
    _close(out.samples, unbatched.samples)
    assert out.passes == dict.fromkeys(names, 6) and out.weights == [[1.0] * 3] * 6


def test_composite_with_one_lora_or_identical_loras_is_that_lora() -> None:
    model = unet_with_loras(2)
    noise, guidance = _inputs()
    ref = _reference(model, noise, guidance, lambda i: "c0", DDIM(steps=6))
    assert torch.equal(lora_composite(model, ["c0"], noise, guidance, sampler=DDIM(steps=6)).samples, ref)
    # c1 <- a copy of c0: the mean of two identical predictions is the prediction
    model.assign_tensors("c1", model.adapter_state_dict("c0"))
    _close(lora_composite(model, ["c0", "c1"], noise, guidance, sampler=DDIM(steps=6)).samples, ref)


def test_merge_baseline_is_all_loras_active_at_the_scale() -> None:
    model = unet_with_loras(2)
    noise, guidance = _inputs()
    out = lora_merge(model, ["c0", "c1"], noise, guidance, lora_scale=1.0, sampler=DDIM(steps=5))
    assert "lora_merge" not in model.adapter_names  # deleted afterwards
    ref = _reference(model, noise, guidance, lambda i: ["c0", "c1"], DDIM(steps=5))
    _close(out.samples, ref)


def test_no_guidance_uses_the_conditional_branch_only() -> None:
    model = unet_with_loras(1)
    noise, guidance = _inputs()
    plain = Guidance(cond=guidance.cond)

    def predict(x, t, i):
        return model(x, torch.full((ROWS,), int(t)), guidance.cond)

    out = lora_switch(model, ["c0"], noise, plain, sampler=DDIM(steps=4))
    assert torch.equal(out.samples, sample(model, noise, predict, DDIM(steps=4)))


def test_bad_requests() -> None:
    model = unet_with_loras(2)
    noise, guidance = _inputs()
    with pytest.raises(MergeOptionError, match="at least one"):
        lora_composite(model, [], noise, guidance)
    with pytest.raises(MergeOptionError, match="repeat"):
        lora_composite(model, ["c0", "c0"], noise, guidance)
    with pytest.raises(AdapterNotFoundError):
        lora_switch(model, ["c0", "nope"], noise, guidance)
    with pytest.raises(MergeOptionError, match="switch_step"):
        lora_switch(model, ["c0"], noise, guidance, switch_step=0)
    with pytest.raises(MergeOptionError, match="2 finite weights"):
        lora_composite(model, ["c0", "c1"], noise, guidance, weights=lambda i: [1.0, float("nan")])
    with pytest.raises(MergeOptionError, match="steps"):
        DDIM(steps=0)
