"""``peftkit.merge.cmlora``: dominant weights, refresh schedule, caching (counted passes), frequency order."""

from __future__ import annotations

import pytest
import torch
from _denoiser import unet_with_loras
from test_composition import _close, _inputs, _reference

from peftkit.merge import MergeOptionError
from peftkit.merge.cmlora import (
    cmlora,
    dominant_index,
    dominant_weights,
    frequency_order,
    high_frequency_share,
    indicator,
    refresh_steps,
)
from peftkit.merge.composition import DDIM, lora_composite

NAMES = ["c0", "c1", "c2"]


def test_dominant_weights_sum_to_n_and_follow_the_indicator() -> None:
    for n in (1, 2, 3, 5):
        for step in (0, 19, 20, 39, 40, 199, 200, 219):
            assert sum(dominant_weights(n, step)) == pytest.approx(n, rel=1e-12)
    assert dominant_weights(1, 0) == [1.0]
    # N=3: c = 2.5, w_non = 3 / 4.5, w_dom = 2.5 * 3 / 4.5
    assert dominant_weights(3, 0) == pytest.approx([2 / 3, 2 / 3, 5 / 3])
    # steps 0-19: the last LoRA dominates, then the first, second, ... every 20 steps; frozen after step 200
    assert [dominant_index(s, 3) for s in (0, 19, 20, 40, 60, 80)] == [2, 2, 0, 1, 2, 0]
    assert indicator(219) == indicator(200) == 10
    # the released code never recomputes the weights; the flag decays c = (N - 0.5) 0.5^indicator
    assert dominant_weights(3, 20) == pytest.approx([5 / 3, 2 / 3, 2 / 3])
    decayed = dominant_weights(3, 20, recompute_dominant_weights=True)
    assert decayed == pytest.approx([1.25 * 3 / 3.25, 3 / 3.25, 3 / 3.25]) and sum(decayed) == pytest.approx(3)


def test_refresh_schedules() -> None:
    # T=16: stride 2 below 6, stride 3 on [6, 14), stride 2 after
    assert refresh_steps(16, 0) == [0, 2, 4, 6, 9, 12, 15]
    assert refresh_steps(10, 1) == list(range(10))
    assert refresh_steps(10, 3) == [0, 3, 6, 9]
    with pytest.raises(MergeOptionError, match="cache_interval"):
        refresh_steps(10, -1)


def test_no_caching_is_the_weighted_composite() -> None:
    model = unet_with_loras(3)
    noise, guidance = _inputs()
    sampler = DDIM(steps=12)
    out = cmlora(model, NAMES, noise, guidance, cache_interval=1, every=4, until=8, sampler=sampler)
    ref = lora_composite(
        model, NAMES, noise, guidance, weights=lambda i: dominant_weights(3, i, 4, 8), sampler=DDIM(steps=12)
    )
    assert torch.equal(out.samples, ref.samples)
    assert out.passes == dict.fromkeys(NAMES, 12) and out.cached == dict.fromkeys(NAMES, 0)
    assert out.dominant == [NAMES[dominant_index(i, 3, 4, 8)] for i in range(12)]
    # and it differs from the unweighted composite
    plain = lora_composite(model, NAMES, noise, guidance, sampler=DDIM(steps=12))
    assert float((out.samples - plain.samples).abs().max()) > 1e-4


def test_one_lora_without_caching_is_that_lora() -> None:
    model = unet_with_loras(1)
    noise, guidance = _inputs()
    out = cmlora(model, ["c0"], noise, guidance, cache_interval=1, sampler=DDIM(steps=5))
    _close(out.samples, _reference(model, noise, guidance, lambda i: "c0", DDIM(steps=5)))


def test_caching_counts_full_passes_and_skips_the_deep_block() -> None:
    model = unet_with_loras(3)
    noise, guidance = _inputs()
    deep = model.get_base_model().deep
    steps, every = 16, 5
    deep.calls = 0
    out = cmlora(model, NAMES, noise, guidance, cache_module="deep", every=every, sampler=DDIM(steps=steps))
    refresh = set(refresh_steps(steps, 0))
    expected = {n: 1 for n in NAMES}  # step 0: every cache is empty
    for t in range(1, steps):
        if t in refresh:
            expected[NAMES[indicator(t, every) % 3]] += 1
    assert out.passes == expected  # {c0: 4 (0, 2, 4, 15), c1: 3 (0, 6, 9), c2: 2 (0, 12)}
    assert out.passes == {"c0": 4, "c1": 3, "c2": 2}
    assert {n: out.passes[n] + out.cached[n] for n in NAMES} == dict.fromkeys(NAMES, steps)
    assert deep.calls == sum(expected.values())  # the deep block ran only on full passes
    # the cache changes the result, but boundedly (the shallow path still sees the current x_t)
    ref = cmlora(model, NAMES, noise, guidance, cache_interval=1, every=every, sampler=DDIM(steps=steps))
    diff = float((out.samples - ref.samples).norm() / ref.samples.norm())
    assert 1e-4 < diff < 0.5
    assert "forward" not in vars(deep)  # the block's own forward is back


def test_cached_pass_reuses_the_last_full_output() -> None:
    # with a refresh schedule that refreshes nothing after step 0 for c1 (every=100: indicator 0 -> only c0),
    # c1's deep output is its step-0 output at every step
    model = unet_with_loras(2)
    noise, guidance = _inputs()
    seen: list[torch.Tensor] = []
    deep = model.get_base_model().deep
    hook = deep.register_forward_hook(lambda m, a, o: seen.append(o.clone()))
    try:
        out = cmlora(model, ["c0", "c1"], noise, guidance, cache_module="deep", every=100, sampler=DDIM(steps=6))
    finally:
        hook.remove()
    assert out.passes == {"c0": 3, "c1": 1} and out.cached == {"c0": 3, "c1": 5}  # refresh steps 0, 2, 4
    assert len(seen) == 12  # the hook sees every call: the recorded output on full passes, the cached one on others
    c0, c1 = seen[0::2], seen[1::2]
    assert all(torch.equal(o, c1[0]) for o in c1)  # c1: its step-0 features at every step
    assert [torch.equal(c0[i], c0[i - 1]) for i in range(1, 6)] == [True, False, True, False, True]


def test_frequency_order_by_high_frequency_share() -> None:
    y, x = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    checker = ((x + y) % 2)[None, None]  # all energy at the Nyquist corner besides DC
    smooth = torch.cos(2 * torch.pi * x / 16)[None, None]  # one low frequency (1/16 cycles per pixel)
    scores = [float(high_frequency_share(smooth)), float(high_frequency_share(checker))]
    assert scores[1] > 0.4 > 0.05 > scores[0]
    assert frequency_order(["background", "character"], scores) == ["character", "background"]
    with pytest.raises(MergeOptionError, match="one score per name"):
        frequency_order(["a"], [1.0, 2.0])


def test_bad_requests() -> None:
    model = unet_with_loras(2)
    noise, guidance = _inputs()
    with pytest.raises(MergeOptionError, match="cache_module"):
        cmlora(model, ["c0", "c1"], noise, guidance, sampler=DDIM(steps=2))
    with pytest.raises(MergeOptionError, match="not a module"):
        cmlora(model, ["c0", "c1"], noise, guidance, cache_module="nope", sampler=DDIM(steps=2))
    with pytest.raises(MergeOptionError, match="every"):
        cmlora(model, ["c0"], noise, guidance, cache_interval=1, every=0)
