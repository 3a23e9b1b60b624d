"""Smoke tests of the vision application examples (``examples/mapsam_dora.py``, ``tooncomposer_spatial_lora.py``,
``lola_specvit.py``): each runs in-process with ``--quick`` (a few steps) and must print finite metrics and the
exact trained-parameter count; the full runs (``slow``) must improve the metric on the shifted data."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

pytestmark = pytest.mark.usefixtures("one_thread")


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (the examples folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------- MapSAM
def test_mapsam_dora_quick(capsys: pytest.CaptureFixture[str]) -> None:
    ex = load_example("mapsam_dora")
    out = ex.main(["--quick", "--seed", "0"])
    printed = capsys.readouterr().out
    for key in ("source_iou", "iou_before", "iou_after", "dice_before", "dice_after"):
        assert math.isfinite(out[key]) and 0.0 <= out[key] <= 1.0, key
    # DoRA on 4 blocks x (qkv 64->192, proj 64->64) at r=4: r(d_in + d_out) + d_out each
    assert out["trainable"] == out["expected_trainable"] == 4 * (4 * 256 + 192 + 4 * 128 + 64) == 7168
    assert out["total"] == n_params(ex.TinySAM()) + out["trainable"]
    assert f"trained parameters {out['trainable']:,} of {out['total']:,}" in printed
    assert "IoU  before" in printed and "after" in printed


@pytest.mark.slow
def test_mapsam_dora_full_improves() -> None:
    out = load_example("mapsam_dora").main(["--seed", "0"])
    assert out["source_iou"] > 0.9  # the pre-training worked on its own distribution
    assert out["iou_before"] < 0.2  # the shift breaks it
    assert out["iou_after"] > out["iou_before"] + 0.4  # measured 0.018 -> 0.709


# ------------------------------------------------------------------------------------------- LoLA-SpecViT
def test_lola_specvit_quick(capsys: pytest.CaptureFixture[str]) -> None:
    ex = load_example("lola_specvit")
    out = ex.main(["--quick", "--seed", "0"])
    printed = capsys.readouterr().out
    for key in ("source_accuracy", "accuracy_before", "accuracy_after"):
        assert math.isfinite(out[key]) and 0.0 <= out[key] <= 1.0, key
    # LoRA r=4 on 2 blocks x (qkv 48->144, proj 48->48, w1 / w3 48->96, w2 96->48): r(d_in + d_out) each
    assert out["trainable"] == out["expected_trainable"] == 2 * 4 * (192 + 96 + 3 * 144) == 5760
    assert out["total"] == n_params(ex.SpecViT()) + out["trainable"]
    assert f"trained parameters {out['trainable']:,} of {out['total']:,}" in printed
    assert "accuracy before" in printed


def test_lola_specvit_sensor_shift() -> None:
    """The target sensor reads 3 bands further, with a gain curve and an offset: the same material measures
    differently (what the adaptation has to undo)."""
    ex = load_example("lola_specvit")
    sigs = ex.signatures(0)
    source, target = ex.sensor(sigs, "source"), ex.sensor(sigs, "target")
    assert source.shape == target.shape == (ex.CLASSES, ex.BANDS)
    torch.testing.assert_close(source, sigs[:, 8 : 8 + ex.BANDS])
    assert (target - source).abs().mean() > 0.05


@pytest.mark.slow
def test_lola_specvit_full_improves() -> None:
    out = load_example("lola_specvit").main(["--seed", "0"])
    assert out["source_accuracy"] > 0.95
    assert out["accuracy_before"] < 0.7  # the new sensor breaks it
    assert out["accuracy_after"] > out["accuracy_before"] + 0.3  # measured 0.502 -> 0.998
