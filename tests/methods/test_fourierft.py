"""FourierFT spec properties (n trainable, ΔW = Re(ifft2(F))·scaling against numpy, random init is not
identity, zero init is, locations rebuilt from the seed and not saved) and parity with PEFT's
``FourierFTConfig`` (Linear and GPT-2 Conv1D)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _structured_parity import assert_grad_parity, assert_parity, on_linear, peft_model
from conftest import make_tiny_net, tiny_bert, tiny_gpt2
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.errors import InvalidConfigError
from peftkit.methods.fourierft import FourierFT, FourierFTConfig


def _adapter(**kw: object) -> tuple[FourierFT, BaseView, nn.Linear]:
    return on_linear(FourierFT, FourierFTConfig(**kw))


def test_count_and_delta_matches_numpy_ifft2() -> None:
    a, base, _ = _adapter(n_frequency=50, scaling=7.0)
    assert a.spectrum.numel() == 50 == FourierFT.expected_trainable(base, a.config)
    dense = np.zeros((20, 24))
    dense[a.indices[0].numpy(), a.indices[1].numpy()] = a.spectrum.detach().double().numpy()
    want = np.fft.ifft2(dense).real * 7.0
    np.testing.assert_allclose(a.delta_weight(base).detach().numpy(), want, atol=1e-6)


def test_locations_distinct_seeded_and_not_saved() -> None:
    a, _, _ = _adapter(n_frequency=100, random_loc_seed=5)
    b, _, _ = _adapter(n_frequency=100, random_loc_seed=5)
    c, _, _ = _adapter(n_frequency=100, random_loc_seed=6)
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices)
    flat = a.indices[0] * 24 + a.indices[1]
    assert flat.unique().numel() == 100
    assert set(a.state_dict()) == {"spectrum"}


def test_random_init_not_identity_zero_init_identity() -> None:
    x = torch.randn(3, 24)
    a, base, lin = _adapter(n_frequency=30)
    with torch.no_grad():
        assert not torch.allclose(a(x, lin(x), base), lin(x))
        z, base, lin = _adapter(n_frequency=30, init="zeros")
        torch.testing.assert_close(z(x, lin(x), base), lin(x), atol=0, rtol=0)


def test_too_many_frequencies_and_bad_fields() -> None:
    with pytest.raises(InvalidConfigError, match="larger than"):
        _adapter(n_frequency=24 * 20 + 1)
    with pytest.raises(InvalidConfigError, match="n_frequency"):
        FourierFTConfig(n_frequency=0)


def test_save_load_rebuilds_locations(tmp_path) -> None:
    model = pk.adapt(make_tiny_net(), FourierFTConfig(n_frequency=40, random_loc_seed=9, targets=["fc1"]), name="a")
    x = torch.randint(0, 40, (2, 5))
    with torch.no_grad():
        want = model(x)
    model.save(tmp_path / "f")
    loaded = pk.load(make_tiny_net(), tmp_path / "f")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, atol=0, rtol=0)


CASES = {
    "bert": (tiny_bert, dict(n_frequency=60, scaling=20.0, target_modules=["query", "value", "dense"])),
    "gpt2": (tiny_gpt2, dict(n_frequency=100, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
    "net": (make_tiny_net, dict(n_frequency=32, scaling=3.0, random_loc_seed=1, target_modules=["fc1", "fc2"])),
}


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_parity(case: str) -> None:
    peft = pytest.importorskip("peft")
    factory, kw = CASES[case]
    base = factory()
    pm = peft_model(base, peft.FourierFTConfig(**kw))  # PEFT's default random spectrum
    cfg = {k: v for k, v in kw.items() if k not in ("target_modules", "fan_in_fan_out")}
    ours = pk.adapt(base, FourierFTConfig(targets=kw["target_modules"], **cfg), name="a")
    copied = 0
    with torch.no_grad():
        for path, a in ours.adapter_modules("a").items():
            layer = pm.get_submodule(f"base_model.model.{path}")
            assert torch.equal(a.indices, layer.indices["default"])  # same locations from the same seed
            a.spectrum.copy_(layer.fourierft_spectrum["default"])
            copied += 1
    assert copied == sum(1 for n, _ in pm.named_parameters() if "fourierft_" in n)
    vocab = 40 if factory is make_tiny_net else 64
    x = torch.randint(0, vocab, (3, 6), generator=torch.Generator().manual_seed(1))
    assert_parity(pm, ours, x)
    assert_grad_parity(pm, ours, x, "fourierft_", rename=lambda n: n)
