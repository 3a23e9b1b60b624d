"""LoRA-SB (spec shared/methods/lowrank.md, LoRA-SB; init.md): LoRA-XS structure with alpha = r, and the
update-approximation init (not the identity at init: one approximate step ahead)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftkit as pk
from peftkit.errors import InvalidConfigError
from peftkit.init import lorasb_factors

R = 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(12, 20)
        self.fc2 = nn.Linear(20, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(3, 12, generator=g), torch.randn(3, 10, generator=g)) for _ in range(4)]


def _summed_grads(net: nn.Module) -> dict[str, torch.Tensor]:
    net = copy.deepcopy(net).train()
    net.zero_grad()
    for batch in _batches():
        mse(net, batch).backward()  # gradients add up over the batches
    return {n: m.weight.grad.clone() for n, m in net.named_children()}


def test_init_is_the_truncated_svd_of_the_sign_update() -> None:
    base = Net()
    init = pk.init.LoRASB(_batches(), total_steps=50, loss_fn=mse, lr=1e-3, warmup_ratio=0.1)
    assert init.step_size == pytest.approx(1e-3 / (0.1 * 50))
    model = pk.adapt(copy.deepcopy(base), pk.get_config("lorasb", r=R, alpha=R, targets=["fc1", "fc2"]), init=init)
    grads = _summed_grads(base)
    for path, a in model.adapter_modules("default").items():
        update = -init.step_size * grads[path].sign()
        delta = a.delta_weight(model.get_submodule(f"model.{path}").base).detach()  # W_eff − W = B R A (s = 1)
        s = torch.linalg.svdvals(update)
        best = float(s[R:].square().sum().sqrt())  # ||ΔŴ − rank_r(ΔŴ)||_F
        assert float((update - delta).norm()) <= 1.01 * best  # ≈ rank_r(ΔŴ) (randomised SVD, niter = 10)
        torch.testing.assert_close(a.A @ a.A.T, torch.eye(R), atol=1e-5, rtol=0)  # A rows orthonormal
        torch.testing.assert_close(a.B.T @ a.B, torch.eye(R), atol=1e-5, rtol=0)  # B columns orthonormal
        assert torch.equal(a.R, torch.diag(torch.diagonal(a.R)))  # R diagonal at init
        torch.testing.assert_close(torch.diagonal(a.R), s[:R], rtol=1e-2, atol=0)
    x = _batches()[0][0]
    assert not torch.allclose(model(x), base(x), atol=1e-4)  # not the identity at init (by design)


def test_only_r_trains_and_reload_is_exact(tmp_path) -> None:
    model = pk.adapt(
        Net(),
        pk.get_config("lorasb", r=R, alpha=R, targets=["fc1", "fc2"]),
        init=pk.init.LoRASB(_batches(), total_steps=10, loss_fn=mse),
    )
    x = _batches()[0][0]
    mse(model, _batches()[0]).backward()
    for a in model.adapter_modules("default").values():
        assert [n for n, p in a.named_parameters() if p.requires_grad] == ["R"] and a.R.grad is not None
        assert not a.A.requires_grad and not a.B.requires_grad
    model.save(tmp_path / "sb")
    assert torch.equal(pk.load(Net(), tmp_path / "sb")(x), model(x))


def test_raw_grad_option_and_factor_helper() -> None:
    upd = torch.randn(10, 8, generator=torch.Generator().manual_seed(0))
    a, b, s = lorasb_factors(upd, 8, niter=10)  # full rank: exact reconstruction
    torch.testing.assert_close(b @ torch.diag(s) @ a, upd, atol=1e-4, rtol=1e-4)
    base = Net()
    init = pk.init.LoRASB(_batches(), total_steps=10, loss_fn=mse, raw_grad=True)
    model = pk.adapt(copy.deepcopy(base), pk.get_config("lorasb", r=R, alpha=R, targets=["fc1"]), init=init)
    adapter = model.adapter_modules("default")["fc1"]
    want = -init.step_size * _summed_grads(base)["fc1"]
    got = adapter.delta_weight(model.get_submodule("model.fc1").base).detach()
    best = float(torch.linalg.svdvals(want)[R:].square().sum().sqrt())
    assert float((want - got).norm()) <= 1.01 * best


def test_bad_settings() -> None:
    with pytest.raises(InvalidConfigError, match="alpha = r"):
        pk.get_config("lorasb", r=4, alpha=8)
    with pytest.raises(InvalidConfigError, match="'lorasb' adapter"):
        pk.adapt(Net(), pk.LoRAConfig(r=2, targets=["fc1"]), init=pk.init.LoRASB(_batches(), total_steps=5))
    with pytest.raises(InvalidConfigError, match="total_steps"):
        pk.init.LoRASB(_batches(), total_steps=0)
