"""The weight compressors EoRA compensates."""

from __future__ import annotations

import pytest
import torch

from peftkit.compress import compressors
from peftkit.compress.errors import CompressorError, RatioError


def test_magnitude_prune_zeroes_exactly_the_smallest_entries():
    w = torch.randn(16, 12)
    out = compressors.magnitude_prune(w, 0.25)
    zeroed = out == 0
    assert int(zeroed.sum()) == 48
    assert float(w[zeroed].abs().max()) <= float(w[~zeroed].abs().min())
    torch.testing.assert_close(out[~zeroed], w[~zeroed], rtol=0, atol=0)


def test_2_4_keeps_the_two_largest_of_every_four():
    w = torch.randn(8, 16)
    out = compressors.prune_2_4(w).reshape(8, 4, 4)
    groups = w.reshape(8, 4, 4)
    assert bool(((out != 0).sum(-1) == 2).all())
    kept = groups.abs().topk(2, dim=-1).indices
    torch.testing.assert_close(out.gather(-1, kept), groups.gather(-1, kept))
    with pytest.raises(CompressorError, match="divisible by 4"):
        compressors.prune_2_4(torch.randn(4, 6))


def test_hqq_error_shrinks_with_bits():
    pytest.importorskip("hqq")
    w = torch.randn(32, 128)
    errors = [float((compressors.hqq_quantize(w, b) - w).norm() / w.norm()) for b in (2, 3, 4)]
    assert errors[0] > errors[1] > errors[2] > 0
    assert errors[2] < 0.15
    assert compressors.get("hqq4")(w).shape == w.shape


def test_get_checks_names_and_ratios():
    with pytest.raises(CompressorError, match="known: magnitude"):
        compressors.get("gptq")
    for bad in (0, 1, -0.1, 1.5, None, True):
        with pytest.raises(RatioError):
            compressors.get("magnitude", bad)
