"""LoRA Switch / Composite / CMLoRA on a ``diffusers`` ``UNet2DModel`` built from a small config (random weights;
skipped where ``diffusers`` is not installed)."""

from __future__ import annotations

import pytest
import torch
from _helpers import randomize

import peftkit as pk
from peftkit.merge.cmlora import cmlora, dominant_weights
from peftkit.merge.composition import DDIM, Guidance, lora_composite, lora_switch, sample

diffusers = pytest.importorskip("diffusers")

ROWS = 2


def _unet() -> pk.AdaptedModel:
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=5,
        attention_head_dim=8,
    )
    config = pk.LoRAConfig(r=2, targets=["to_q", "to_v", "conv1", "conv2", "time_emb_proj"])
    model = pk.adapt(unet, config, "c0")
    model.add_adapter("c1", config)
    randomize(model, "c0", 1, 0.1)
    randomize(model, "c1", 2, 0.1)
    return model.eval()


def _inputs() -> tuple[torch.Tensor, Guidance]:
    noise = torch.randn(ROWS, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    return noise, Guidance(cond=torch.tensor([0, 2]), uncond=torch.tensor([4, 4]), scale=2.0)


def _mean_of(model, names, guidance):
    def predict(x, t, i):
        u = c = 0
        for n in names:
            model.set_adapter(n)
            ts = torch.full((ROWS,), int(t))
            u = u + model(x, ts, guidance.uncond).sample / len(names)
            c = c + model(x, ts, guidance.cond).sample / len(names)
        return u + guidance.scale * (c - u)

    return predict


def test_switch_and_composite_on_a_diffusers_unet() -> None:
    model = _unet()
    noise, guidance = _inputs()
    one = lora_switch(model, ["c1"], noise, guidance, sampler=DDIM(steps=4))
    ref = sample(model, noise, _mean_of(model, ["c1"], guidance), DDIM(steps=4))
    # (not bitwise: the reference runs the two guidance branches as separate batches)
    torch.testing.assert_close(one.samples, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    both = lora_composite(model, ["c0", "c1"], noise, guidance, sampler=DDIM(steps=4))
    ref = sample(model, noise, _mean_of(model, ["c0", "c1"], guidance), DDIM(steps=4))
    torch.testing.assert_close(both.samples, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert float((both.samples - one.samples).abs().max()) > 1e-4


def test_cmlora_caches_the_mid_block() -> None:
    model = _unet()
    noise, guidance = _inputs()
    mid = model.get_base_model().mid_block
    calls = []
    hook = mid.resnets[0].register_forward_hook(lambda m, a, o: calls.append(1))  # runs only when mid_block runs
    try:
        out = cmlora(model, ["c0", "c1"], noise, guidance, cache_module="mid_block", sampler=DDIM(steps=6))
    finally:
        hook.remove()
    # refresh steps of 6: 0, 2, 4; every LoRA at step 0, then only LoRA indicator mod 2 = c0
    assert out.passes == {"c0": 3, "c1": 1} and out.cached == {"c0": 3, "c1": 5}
    assert len(calls) == 4 and "forward" not in vars(mid)
    full = cmlora(model, ["c0", "c1"], noise, guidance, cache_interval=1, sampler=DDIM(steps=6))
    ref = lora_composite(
        model, ["c0", "c1"], noise, guidance, weights=lambda i: dominant_weights(2, i), sampler=DDIM(steps=6)
    )
    assert torch.equal(full.samples, ref.samples)
