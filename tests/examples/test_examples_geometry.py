"""Smoke tests of the geometry and detection application examples (``examples/lora3d_selfcalib.py``,
``examples/florence2_detection.py``): each runs in-process with ``--quick`` (a few steps) and must print finite
metrics and the exact trained-parameter count; the parts that carry the method (LoRA3D's robust fusion,
Florence-2's box tokens) are checked on their own; the full runs (``slow``) must improve the metric."""

from __future__ import annotations

import math

import pytest
import torch
from _scripts import load_script, parameter_count
from torch import Tensor, nn

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------- LoRA3D
def test_lora3d_quick(capsys: pytest.CaptureFixture[str]) -> None:
    ex = load_script("examples/lora3d_selfcalib.py")
    out = ex.main(["--quick", "--seed", "0"])
    printed = capsys.readouterr().out
    for key in ("scene_before", "scene_after", "held_out_before", "held_out_after", "pseudo_label_error"):
        assert math.isfinite(out[key]) and out[key] >= 0, key
    # LoRA r=8 on fc1 (256->512), fc2 and fc3 (512->512), head (512->512): r(d_in + d_out) each
    assert out["trainable"] == 8 * ((256 + 512) + 3 * (512 + 512)) == 30720
    assert out["total"] == parameter_count(ex.DepthMLP()) + out["trainable"]
    assert f"trainable parameters: {out['trainable']:,} of {out['total']:,}" in printed
    assert "before" in printed and "after" in printed


class _Fixed(nn.Module):
    """A stand-in model that returns given depth predictions and confidence logits, whatever the image."""

    def __init__(self, depth: Tensor, conf: Tensor) -> None:
        super().__init__()
        self.depth, self.conf = depth, conf

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.depth, self.conf


def test_lora3d_robust_fusion_outvotes_the_biased_border() -> None:
    """Predictions with the target camera's error model (true depth + the vignetting's ``−ln V / k`` bias, up
    to ~1.8 in the corners, + noise): the Geman–McClure fusion's pseudo-labels are close to the truth on the
    kept pixels, the border pixels included, and it never reads the ground truth."""
    ex = load_script("examples/lora3d_selfcalib.py")
    g = torch.Generator().manual_seed(0)
    z, tex = ex.scenes(1, g)
    views = ex.scene_views(z[0], tex[0], "target", g)
    truth = views.pop("depth")  # the fusion gets no ground truth
    bias = -torch.log(ex.vignetting()).reshape(-1) / ex.K_FOG
    assert bias.max() > 1.5
    noisy = truth + bias + 0.05 * torch.randn(truth.shape, generator=g)
    raw_error = float((noisy - truth).abs().mean())
    label, weight = ex.pseudo_labels(_Fixed(noisy, torch.zeros_like(noisy)), views)
    kept = weight > 0
    assert 0.3 < float(kept.float().mean()) < 1.0
    border = kept & (bias > 0.5).expand_as(kept)
    assert border.any()
    assert float((label - truth)[kept].abs().mean()) < 0.1 * raw_error
    assert float((label - truth)[border].abs().mean()) < 0.1
    assert float(weight.max()) <= 1.0


# ---------------------------------------------------------------------------------------------- Florence-2
def test_florence2_quick(capsys: pytest.CaptureFixture[str]) -> None:
    ex = load_script("examples/florence2_detection.py")
    out = ex.main(["--quick", "--seed", "0"])
    printed = capsys.readouterr().out
    for key in ("miou_before", "miou_after", "ap50_before", "ap50_after", "class_acc_before", "class_acc_after"):
        assert math.isfinite(out[key]) and 0.0 <= out[key] <= 1.0, key
    # LoRA r=8, d=64: q/k/v/out 64->64 (r·128 each), fc1 64->128 and fc2 128->64 (r·192 each);
    # 1 vision + 1 encoder block (4 projections), 2 decoder blocks (8: self- and cross-attention)
    per_block = lambda projections: 8 * (projections * 128 + 2 * 192)  # noqa: E731
    assert out["trainable"] == 2 * per_block(4) + 2 * per_block(8) == 36864
    assert out["total"] == parameter_count(ex.TinyFlorence()) + out["trainable"]
    assert f"trainable parameters: {out['trainable']:,} of {out['total']:,}" in printed
    assert "before" in printed and "after LoRA" in printed


def test_florence2_box_tokens() -> None:
    """Answers are ``label <loc_x1> <loc_y1> <loc_x2> <loc_y2> </s>`` with one location bin per pixel; decoding
    reads location tokens back to pixel boxes."""
    ex = load_script("examples/florence2_detection.py")
    images, boxes = ex.render(16, "ring", seed=0)
    assert images.shape == (16, 1, ex.SIZE, ex.SIZE)
    assert bool(((boxes >= 0) & (boxes <= ex.SIZE)).all()) and bool((boxes[:, 2:] > boxes[:, :2]).all())
    tokens = ex.answer_tokens("ring", boxes)
    assert tokens.shape == (16, ex.ANSWER)
    assert bool((tokens[:, 0] == ex.CLASSES["ring"]).all()) and bool((tokens[:, -1] == ex.EOS).all())
    locs = tokens[:, 1:5] - ex.LOC0
    assert bool(((locs >= 0) & (locs < ex.BINS)).all())
    assert float((ex.dequantise(locs) - boxes).abs().max()) <= ex.SIZE / ex.BINS  # within one bin
    same = torch.tensor([[2.0, 3.0, 10.0, 7.0]])
    torch.testing.assert_close(ex.iou(same, same), torch.ones(1))
    torch.testing.assert_close(ex.iou(same, torch.tensor([[6.0, 3.0, 14.0, 7.0]])), torch.tensor([1 / 3]))
    labels, decoded = ex.decode(ex.TinyFlorence().eval(), images[:4])
    assert labels.shape == (4,) and decoded.shape == (4, 4)


# ------------------------------------------------------------------------------------------------ full runs
@pytest.mark.slow
def test_lora3d_full_improves() -> None:
    out = load_script("examples/lora3d_selfcalib.py").main(["--seed", "0"])
    assert out["pseudo_label_error"] < 0.6 * out["scene_before"]  # the robust fusion beats the raw predictions
    assert out["scene_after"] < 0.6 * out["scene_before"]  # measured 0.290 -> 0.127
    assert out["held_out_after"] < 0.6 * out["held_out_before"]  # measured 0.319 -> 0.143


@pytest.mark.slow
def test_florence2_full_improves() -> None:
    out = load_script("examples/florence2_detection.py").main(["--seed", "0"])
    assert out["source_miou"] > 0.7  # the pre-training worked on its own object kind
    assert out["class_acc_before"] == 0.0  # it never names the new kind
    assert out["miou_after"] > out["miou_before"] + 0.2
    assert out["ap50_after"] > out["ap50_before"] + 0.3
