"""Bi-LoRA / Bi-AdaptFormer (1-bit adapters): the codebook, exactly 2^b quantised values, the straight-through
gradient, the packed-bit deployable form (size = ceil(b·numel/8) + 8 bytes per tensor, measured against fp32),
exact save/load round trips of both saved forms, training that resumes exactly from a checkpoint, and Bi-LoRA's
dropout placement."""

from __future__ import annotations

import math
import os

import pytest
import safetensors.torch
import torch
from conftest import tiny_vit
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.core.errors import InvalidConfigError
from peftkit.methods.onebit import (
    BiAdaptFormer,
    BiAdaptFormerConfig,
    BiLoRA,
    BiLoRAConfig,
    normal_codebook,
    pack_codes,
    save_packed,
    unpack_codes,
)


def test_codebook() -> None:
    values, thresholds = normal_codebook(1)
    torch.testing.assert_close(values, torch.tensor([-0.6745, 0.6745]), atol=1e-4, rtol=0)
    torch.testing.assert_close(thresholds, torch.zeros(1))
    for bits in (2, 4, 8):
        v, t = normal_codebook(bits)
        assert v.numel() == 2**bits and t.numel() == 2**bits - 1
        assert torch.all(v[1:] > v[:-1]) and torch.allclose(v, -v.flip(0), atol=1e-5)  # sorted, symmetric


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_roundtrip_and_distinct_values(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (13, 7), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(bits * 91 / 8)
    assert torch.equal(unpack_codes(packed, bits, codes.shape), codes)
    a = BiLoRA(BaseView(nn.Linear(256, 48)), BiLoRAConfig(r=64, bits=bits))
    with torch.no_grad():
        a.down.normal_(generator=g)  # 16384 Gaussian weights: every cell of the codebook is hit
        w_q = a.quantised("down")
        values, _ = normal_codebook(bits)
        grid = values * a.down.std() + a.down.mean()
        assert torch.isin(w_q, grid).all()  # every quantised weight is a codebook value
        if bits <= 4:
            assert w_q.unique().numel() == 2**bits
            torch.testing.assert_close(w_q.unique(), grid)
        else:  # the official 500 iterations from zeros leave the 8-bit middle codes ~0 apart (not converged)
            assert 100 < w_q.unique().numel() <= 2**bits


def test_straight_through_gradient() -> None:
    torch.manual_seed(0)
    a = BiLoRA(BaseView(nn.Linear(16, 12)), BiLoRAConfig(r=4))
    g = torch.randn(4, 16)
    (a.quantised("down") * g).sum().backward()
    grad = a.down.grad.clone()
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # by hand: W_q = (û + c)·σ + μ with c = v[code] − û held constant (the STE), μ, σ differentiable
    w = a.down.detach().clone().requires_grad_(True)
    mu, sigma = w.mean(), w.std()
    u = (w - mu) / (sigma + 1e-5)
    c = (torch.where(u.detach() > 0, 0.6745, -0.6745) - u).detach()
    ((u + c) * sigma + mu).mul(g).sum().backward()
    torch.testing.assert_close(grad, w.grad, atol=1e-4, rtol=1e-4)


def test_packed_file_stores_packed_bits(tmp_path) -> None:
    """A 768-wide Bi-LoRA adapter (r = 32, q and v of one block): ``save_packed`` writes uint8 codes + [μ, σ]
    only (the paper's deployable form); the default ``save`` writes the latent fp32 weights (the checkpoint)."""
    torch.manual_seed(0)
    base = nn.ModuleDict({"query": nn.Linear(768, 768), "value": nn.Linear(768, 768)})
    base.forward = lambda x: base["query"](x) + base["value"](x)  # type: ignore[method-assign]
    model = pk.adapt(base, BiLoRAConfig(r=32, targets=["query", "value"]))
    save_packed(model, tmp_path / "bits")
    tensors = safetensors.torch.load_file(tmp_path / "bits" / "adapter.safetensors")
    assert sorted(tensors) == sorted(
        f"{m}.{w}_{p}" for m in ("query", "value") for w in ("down", "up") for p in ("codes", "stats")
    )
    numel = 32 * 768
    for key, t in tensors.items():
        if key.endswith("_codes"):
            assert t.dtype == torch.uint8 and t.numel() == math.ceil(numel / 8)
        else:
            assert t.dtype == torch.float32 and t.numel() == 2
    data_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert data_bytes == 4 * (math.ceil(numel / 8) + 8)
    model.save(tmp_path / "latent")
    latent = safetensors.torch.load_file(tmp_path / "latent" / "adapter.safetensors")
    assert sorted(latent) == sorted(f"{m}.{w}" for m in ("query", "value") for w in ("down", "up"))
    for key, t in latent.items():
        module, _, weight = key.rpartition(".")
        assert t.dtype == torch.float32 and torch.equal(t, getattr(model.adapter_modules("default")[module], weight))
    size_bits = os.path.getsize(tmp_path / "bits" / "adapter.safetensors")
    size_fp32 = os.path.getsize(tmp_path / "latent" / "adapter.safetensors")
    print(f"1-bit adapter file {size_bits} B vs fp32 checkpoint {size_fp32} B ({size_fp32 / size_bits:.1f}x smaller)")
    assert size_fp32 / size_bits > 25  # 32x on the data, less the safetensors header
    # saving packed does not change what model.save writes afterwards
    assert all(a.saved_form == "latent" for a in model.adapter_modules("default").values())


@pytest.mark.parametrize("cls", ["bi_lora", "bi_adaptformer"])
@pytest.mark.parametrize("packed", [False, True])
def test_roundtrip_is_exact(cls: str, packed: bool, tmp_path) -> None:
    cfg = (BiLoRAConfig if cls == "bi_lora" else BiAdaptFormerConfig)(r=4, dropout=0.0, seed=0)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = pk.adapt(tiny_vit(), cfg).eval()
    with torch.no_grad():
        want = model(pixel_values=x).logits
    save_packed(model, tmp_path / "ad") if packed else model.save(tmp_path / "ad")
    loaded = pk.load(tiny_vit(), tmp_path / "ad").eval()
    assert {a.saved_form for a in loaded.adapter_modules("default").values()} == {"packed" if packed else "latent"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, want, atol=0, rtol=0)
    # torch's own load_state_dict path reads both forms too
    fresh = pk.adapt(tiny_vit(), cfg).eval()
    fresh.load_state_dict(model.state_dict() if not packed else loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(pixel_values=x).logits, want, atol=0, rtol=0)
    # a loaded adapter trains: gradients reach its latent weights and a step changes the outputs
    opt = torch.optim.SGD([p for p in loaded.parameters() if p.requires_grad], lr=1.0)
    loaded(pixel_values=x).logits.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loaded.parameters() if p.requires_grad)
    opt.step()
    with torch.no_grad():
        assert not torch.equal(loaded(pixel_values=x).logits, want)


def _train_steps(model: nn.Module, x: torch.Tensor, steps: int, lr: float) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(pixel_values=x).logits.pow(2).mean().backward()
        opt.step()


@pytest.mark.parametrize("cls", ["bi_lora", "bi_adaptformer"])
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("lr", [1e-12, 0.05])
def test_training_resumes_exactly_after_save_and_load(cls: str, bits: int, lr: float, tmp_path) -> None:
    """Train 3 steps, save, load onto a fresh base, then one more step with the same data on both: the same
    outputs (the saved latent weights are the whole state). Before the fix the reloaded latent weights were the
    dequantised values, whose own μ, σ differ: one lr=1e-12 step moved the adapters' contribution to the output by
    55% (1-bit Bi-LoRA), 23% (2-bit), 11% (1-bit Bi-AdaptFormer)."""
    cfg = (BiLoRAConfig if cls == "bi_lora" else BiAdaptFormerConfig)(r=4, bits=bits, scale=10.0, dropout=0.0, seed=0)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = pk.adapt(tiny_vit(), cfg).train()
    _train_steps(model, x, 3, 0.05)
    model.save(tmp_path / "ad")
    loaded = pk.load(tiny_vit(), tmp_path / "ad").train()
    for m in (model, loaded):
        _train_steps(m, x, 1, lr)
    with torch.no_grad():
        want, got = model.eval()(pixel_values=x).logits, loaded.eval()(pixel_values=x).logits
        effect = float((want - tiny_vit()(pixel_values=x).logits).abs().max())  # the adapters' share of the output
    assert effect > 1e-2 * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * effect)


def test_bi_lora_dropout_after_the_down_projection() -> None:
    """Official binary_adapter/lora.py: x → Q(down) → dropout → Q(up): the mask has the rank's width."""
    lin = nn.Linear(16, 12)
    base = BaseView(lin)
    a = BiLoRA(base, BiLoRAConfig(r=4, dropout=0.5, scale=2.0)).train()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_out = lin(x)
        torch.manual_seed(3)
        got = a(x, base_out, base)
        torch.manual_seed(3)
        hidden = torch.nn.functional.dropout(x @ a.quantised("down").T, 0.5, training=True)
        want = base_out + 2.0 * hidden @ a.quantised("up").T
        assert (hidden == 0).any() and (hidden != 0).any()  # the mask drops some entries of [5, r], not all
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    a.eval()  # no dropout in eval: the merged weight gives the same output
    with torch.no_grad():
        torch.testing.assert_close(a(x, base_out, base), x @ (lin.weight + a.delta_weight(base)).T + lin.bias)


def test_save_packed_needs_a_one_bit_adapter(tmp_path) -> None:
    model = pk.adapt(tiny_vit(), pk.LoRAConfig(r=2, targets=["q_proj"]))
    with pytest.raises(InvalidConfigError, match="not a 1-bit"):
        save_packed(model, tmp_path / "x")
    model.add_adapter("b", BiLoRAConfig(r=2, targets=["q_proj", "v_proj"]))
    with pytest.raises(InvalidConfigError, match="name is needed"):
        save_packed(model, tmp_path / "x")
    save_packed(model, tmp_path / "x", "b")
    assert pk.load(tiny_vit(), tmp_path / "x").adapter_modules("b")


def test_bi_adaptformer_placement_and_count() -> None:
    model = pk.adapt(tiny_vit(), BiAdaptFormerConfig(r=4))
    assert sorted(model.layer_paths["default"]) == ["vit.layers.0.mlp", "vit.layers.1.mlp"]
    assert model.trainable_parameters().trainable == 2 * 4 * (32 + 32)
    assert isinstance(next(iter(model.adapter_modules("default").values())), BiAdaptFormer)
    with pytest.raises(InvalidConfigError, match="bits"):
        BiLoRAConfig(bits=3)
