"""RandLoRA spec properties (rN + N·d_min trainable, full-rank ΔW, seeded bases that are not saved, identity at
init, gradient only on λ and γ) and parity with PEFT's ``RandLoraConfig`` (dense, sparse and mixed shapes)."""

from __future__ import annotations

import os

import pytest
import torch
from _structured_parity import assert_grad_parity, assert_parity, fill, peft_model
from conftest import make_tiny_net, tiny_bert
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.errors import InvalidConfigError
from peftkit.methods.randlora import RandLoRA, RandLoRAConfig, random_bases


def _adapter(d_in: int = 24, d_out: int = 40, **kw: object) -> tuple[RandLoRA, BaseView, nn.Linear]:
    torch.manual_seed(0)
    lin = nn.Linear(d_in, d_out)
    base = BaseView(lin)
    return RandLoRA(base, RandLoRAConfig(**kw)), base, lin


def test_count_and_shapes() -> None:
    a, base, _ = _adapter(r=5)  # d_min 24 -> N = 5
    assert a.lam.shape == (5, 5) and a.gamma.shape == (5, 24)
    assert sum(p.numel() for p in a.parameters()) == 5 * 5 + 5 * 24 == RandLoRA.expected_trainable(base, a.config)
    assert a.A.shape == (5, 1, 24) and a.B.shape == (40, 5, 5)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_full_rank_with_random_scalings(shape: tuple[int, int]) -> None:
    a, base, lin = _adapter(*shape, r=4)
    with torch.no_grad():
        a.lam.normal_()
        a.gamma.normal_()
    d = a.delta_weight(base)
    assert d.shape == lin.weight.shape
    assert torch.linalg.matrix_rank(d.double()).item() == 24  # d_min, although r = 4
    x = torch.randn(3, shape[0])
    with torch.no_grad():
        out = a(x, lin(x), base)
        # float64 reference; outputs reach ~1e4 (random scalings), so the tolerance follows their magnitude
        ref = lin(x).double() + x.double() @ d.double().T
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


def test_same_key_same_bases_identity_at_init() -> None:
    a, base, lin = _adapter(r=4, projection_prng_key=3)
    b, _, _ = _adapter(r=4, projection_prng_key=3)
    c, _, _ = _adapter(r=4, projection_prng_key=4)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and not torch.equal(a.B, c.B)
    assert a.B.dtype == torch.bfloat16 and abs(a.B.float().std().item() - 1) < 0.05
    x = torch.randn(3, 24)
    torch.testing.assert_close(a(x, lin(x), base), lin(x), atol=0, rtol=0)


def test_sparse_bases_are_ternary() -> None:
    _, b_s = random_bases(0, 4, 40, 24, 3.0)
    vals = torch.unique(torch.sign(b_s))
    assert set(vals.tolist()) <= {-1.0, 0.0, 1.0}
    frac_zero = (b_s == 0).float().mean().item()
    assert 0.55 < frac_zero < 0.78  # P(0) = 1 - 1/s = 2/3


def test_saved_file_much_smaller_than_bases(tmp_path) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
    model = pk.adapt(net, RandLoRAConfig(r=128, targets=["0", "2"]), name="a")
    adapters = list(model.adapter_modules("a").values())
    bases_bytes = sum(b.numel() * b.element_size() for a in adapters for b in (a.A, a.B))
    model.save(tmp_path / "r")
    saved = os.path.getsize(tmp_path / "r" / "adapter.safetensors")
    assert saved * 50 < bases_bytes, (saved, bases_bytes)
    assert set(adapters[0].state_dict()) == {"lam", "gamma"}


def test_only_lambda_gamma_get_gradients_and_shape_errors() -> None:
    a, base, lin = _adapter(r=4)
    x = torch.randn(3, 24)
    a(x, lin(x), base).sum().backward()
    assert a.lam.grad is not None and a.gamma.grad is not None
    assert not a.A.requires_grad and not a.B.requires_grad
    with pytest.raises(InvalidConfigError, match="smaller"):
        _adapter(r=4, projection_shape=[30, 30])
    with pytest.raises(InvalidConfigError, match="projection_shape"):
        RandLoRAConfig(projection_shape=[3])


CASES = {  # (factory, PEFT kwargs, our extra kwargs)
    "bert-same-shape": (tiny_bert, dict(r=4, randlora_alpha=8, target_modules=["query", "value"]), {}),
    "bert-mixed": (
        tiny_bert,
        dict(r=5, randlora_alpha=10, target_modules=["query", "intermediate.dense", "output.dense"]),
        dict(projection_shape=[48, 48]),
    ),
    "net-sparse": (
        make_tiny_net,
        dict(r=3, randlora_alpha=6, target_modules=["fc1", "fc2"], sparse=True, projection_prng_key=2),
        dict(projection_shape=[32, 32]),
    ),
    "net-very-sparse": (
        make_tiny_net,
        dict(r=4, target_modules=["fc1"], very_sparse=True),
        {},
    ),
}
NAMES = {"randlora_alpha": "alpha"}


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_parity(case: str) -> None:
    peft = pytest.importorskip("peft")
    factory, kw, extra = CASES[case]
    base = factory()
    pm = peft_model(base, peft.RandLoraConfig(**kw))
    fill(pm, "randlora_")
    cfg = {NAMES.get(k, k): v for k, v in kw.items() if k != "target_modules"}
    ours = pk.adapt(base, RandLoRAConfig(targets=kw["target_modules"], **cfg, **extra), name="a")
    names = {"lam": "lambda", "gamma": "gamma"}
    copied = 0
    with torch.no_grad():
        for path, a in ours.adapter_modules("a").items():
            layer = pm.get_submodule(f"base_model.model.{path}")
            a.lam.copy_(layer.randlora_lambda["default"])
            a.gamma.copy_(layer.randlora_gamma["default"])
            peft_a = layer.randlora_A["default"][:, :, : a.d_min]
            peft_b = layer.randlora_B["default"][: a.d_max, : a.n]
            assert torch.equal(a.A, peft_a) and torch.equal(a.B, peft_b)  # same bases from the same key
            copied += 2
    assert copied == sum(1 for n, _ in pm.named_parameters() if "randlora_" in n)
    x = torch.randint(0, 40 if factory is make_tiny_net else 64, (3, 6), generator=torch.Generator().manual_seed(1))
    assert_parity(pm, ours, x)
    assert_grad_parity(pm, ours, x, "randlora_", rename=lambda n: names[n])
