"""Smoke tests of the vision application examples (``examples/mapsam_dora.py``, ``tooncomposer_spatial_lora.py``,
``lola_specvit.py``): each runs in-process with ``--quick`` (a few steps) and must print finite metrics and the
exact trained-parameter count; the full runs (``slow``) must improve the metric on the shifted data."""

from __future__ import annotations

import math

import pytest
import torch
from _scripts import load_script, parameter_count

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------- MapSAM
def test_mapsam_dora_quick(capsys: pytest.CaptureFixture[str]) -> None:
    ex = load_script("examples/mapsam_dora.py")
    out = ex.main(["--quick", "--seed", "0"])
    printed = capsys.readouterr().out
    for key in ("source_iou", "iou_before", "iou_after", "dice_before", "dice_after"):
        assert math.isfinite(out[key]) and 0.0 <= out[key] <= 1.0, key
    # DoRA on 4 blocks x (qkv 64->192, proj 64->64) at r=4: r(d_in + d_out) + d_out each
    assert out["trainable"] == out["expected_trainable"] == 4 * (4 * 256 + 192 + 4 * 128 + 64) == 7168
    assert out["total"] == parameter_count(ex.TinySAM()) + out["trainable"]
    assert f"trained parameters {out['trainable']:,} of {out['total']:,}" in printed
    assert "IoU  before" in printed and "after" in printed


@pytest.mark.slow
def test_mapsam_dora_full_improves() -> None:
    out = load_script("examples/mapsam_dora.py").main(["--seed", "0"])
    assert out["source_iou"] > 0.9  # the pre-training worked on its own distribution
    assert out["iou_before"] < 0.2  # the shift breaks it
    assert out["iou_after"] > out["iou_before"] + 0.4  # measured 0.018 -> 0.709


# ------------------------------------------------------------------------------------------- ToonComposer
def test_tooncomposer_spatial_lora_quick(capsys: pytest.CaptureFixture[str]) -> None:
    ex = load_script("examples/tooncomposer_spatial_lora.py")
    out = ex.main(["--quick", "--seed", "0"])
    printed = capsys.readouterr().out
    for key in ("source_mse", "source_mse_copy_last", "mse_before", "mse_after", "mse_copy_last"):
        assert math.isfinite(out[key]) and out[key] >= 0.0, key
    # the preset adapts the four Linear layers of every block's spatial part, none of its temporal part
    expected = [f"blocks.{i}.spatial.{n}" for i in range(3) for n in ("attn.proj", "attn.qkv", "mlp.0", "mlp.2")]
    assert out["adapted_layers"] == sorted(expected)
    # LoRA r=8: r(d_in + d_out) on qkv 64->192, proj 64->64, mlp.0 64->128, mlp.2 128->64, in 3 blocks
    assert out["trainable"] == out["expected_trainable"] == 3 * 8 * (256 + 128 + 192 + 192) == 18432
    assert out["total"] == parameter_count(ex.TinyVideoTransformer()) + out["trainable"]
    # every temporal tensor (3 blocks x norm weight/bias, qkv weight/bias, proj weight/bias) bit-identical
    assert out["temporal_identical"] is True and out["temporal_tensors"] == 18
    assert f"trained parameters {out['trainable']:,} of {out['total']:,}" in printed
    assert "bit-identical, no adapter" in printed
    # even 8 LoRA steps learn most of the new palette and background (measured 0.1027 -> 0.0345)
    assert out["mse_after"] < 0.6 * out["mse_before"]


def test_tooncomposer_temporal_layers_get_no_gradient() -> None:
    """On the example's model, the preset leaves the temporal layers without adapter and without gradient."""
    import peftkit as pk
    from peftkit.methods.dera import spatial_only_lora

    ex = load_script("examples/tooncomposer_spatial_lora.py")
    model = pk.adapt(ex.TinyVideoTransformer(), spatial_only_lora(ex.TinyVideoTransformer(), r=2, seed=0))
    clips = ex.render(4, "cartoon", 0)
    for adapter in model.adapter_modules("default").values():  # move B off zero so the update is not trivially 0
        for p in adapter.parameters():
            torch.nn.init.normal_(p, std=0.1)
    ex.next_frame_loss(model, clips).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".spatial." in n for n in grads)
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    temporal = [(n, p) for n, p in model.named_parameters() if ".temporal." in n]
    assert len(temporal) == 18 and all(not p.requires_grad and p.grad is None for _, p in temporal)


@pytest.mark.slow
def test_tooncomposer_spatial_lora_full_improves() -> None:
    out = load_script("examples/tooncomposer_spatial_lora.py").main(["--seed", "0"])
    assert out["source_mse"] < 0.8 * out["source_mse_copy_last"]  # the base model predicts motion: 0.0120 vs 0.0206
    assert out["mse_after"] < 0.4 * out["mse_before"]  # measured 0.0565 -> 0.0113
    assert out["mse_after"] < out["mse_copy_last"]  # still better than copying the last frame: motion kept
    assert out["temporal_identical"] is True


# ------------------------------------------------------------------------------------------- LoLA-SpecViT
def test_lola_specvit_quick(capsys: pytest.CaptureFixture[str]) -> None:
    ex = load_script("examples/lola_specvit.py")
    out = ex.main(["--quick", "--seed", "0"])
    printed = capsys.readouterr().out
    for key in ("source_accuracy", "accuracy_before", "accuracy_after"):
        assert math.isfinite(out[key]) and 0.0 <= out[key] <= 1.0, key
    # LoRA r=4 on 2 blocks x (qkv 48->144, proj 48->48, w1 / w3 48->96, w2 96->48): r(d_in + d_out) each
    assert out["trainable"] == out["expected_trainable"] == 2 * 4 * (192 + 96 + 3 * 144) == 5760
    assert out["total"] == parameter_count(ex.SpecViT()) + out["trainable"]
    assert f"trained parameters {out['trainable']:,} of {out['total']:,}" in printed
    assert "accuracy before" in printed


def test_lola_specvit_sensor_shift() -> None:
    """The target sensor reads 3 bands further, with a gain curve and an offset: the same material measures
    differently (what the adaptation has to undo)."""
    ex = load_script("examples/lola_specvit.py")
    sigs = ex.signatures(0)
    source, target = ex.sensor(sigs, "source"), ex.sensor(sigs, "target")
    assert source.shape == target.shape == (ex.CLASSES, ex.BANDS)
    torch.testing.assert_close(source, sigs[:, 8 : 8 + ex.BANDS])
    assert (target - source).abs().mean() > 0.05


@pytest.mark.slow
def test_lola_specvit_full_improves() -> None:
    out = load_script("examples/lola_specvit.py").main(["--seed", "0"])
    assert out["source_accuracy"] > 0.95
    assert out["accuracy_before"] < 0.7  # the new sensor breaks it
    assert out["accuracy_after"] > out["accuracy_before"] + 0.3  # measured 0.502 -> 0.998
