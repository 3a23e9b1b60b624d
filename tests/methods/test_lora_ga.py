"""LoRA-GA init (Wang et al., 2024): factor properties, identity at init with an untouched
base, the first step approximates the full-gradient step, parity with PEFT's ``init_lora_weights="lora_ga"``."""

from __future__ import annotations

import copy

import pytest
import torch
from _residual_dropout import assert_train_mode_parity, move_off_init, peft_lora_on_residual_base
from torch import nn

import peftkit as pk
from peftkit.errors import InvalidConfigError
from peftkit.init import lora_ga_factors


class Net(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(12, 20)
        self.fc2 = nn.Linear(20, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _batches(n: int = 4, rows: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(rows, 12, generator=g), torch.randn(rows, 10, generator=g)) for _ in range(n)]


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _mean_grads(net: nn.Module) -> dict[str, torch.Tensor]:
    """The averaged gradient of the base weights, computed directly (reference for the initialiser)."""
    net = copy.deepcopy(net)
    total = {n: torch.zeros_like(m.weight) for n, m in net.named_children()}
    batches = _batches()
    for batch in batches:
        net.zero_grad()
        mse(net, batch).backward()
        for n, m in net.named_children():
            total[n] += m.weight.grad
    return {n: g / len(batches) for n, g in total.items()}


def test_unit_factors_are_orthonormal_and_span_the_top_gradient_subspace() -> None:
    grad = _mean_grads(Net())["fc1"]  # [20, 12]
    r = 3
    a, b = lora_ga_factors(grad, r, 1.0, scale_mode="unit")
    torch.testing.assert_close(a @ a.T, torch.eye(r), atol=1e-5, rtol=0)  # A rows orthonormal
    torch.testing.assert_close(b.T @ b, torch.eye(r), atol=1e-5, rtol=0)  # B columns orthonormal
    u, _, vh = torch.linalg.svd(grad)
    torch.testing.assert_close(a.T @ a, vh[:r].T @ vh[:r], atol=1e-4, rtol=0)  # span(Aᵀ) = top-r right subspace
    torch.testing.assert_close(b @ b.T, u[:, r : 2 * r] @ u[:, r : 2 * r].T, atol=1e-4, rtol=0)  # B: pairs r..2r
    # stable scale: both factors times d_out^(1/4)/sqrt(gamma)
    a16, b16 = lora_ga_factors(grad, r, 1.0, scale_mode="stable", gamma=16)
    factor = 20**0.25 / 4
    torch.testing.assert_close(a16, a * factor)
    torch.testing.assert_close(b16, b * factor)


def test_initialiser_uses_the_mean_gradient_and_keeps_the_model_and_base() -> None:
    net = Net()
    x = _batches()[0][0]
    want = net(x)
    weights = {n: m.weight.detach().clone() for n, m in net.named_children()}
    init = pk.init.LoRAGA(_batches(), loss_fn=mse, scale="unit")
    model = pk.adapt(net, pk.LoRAConfig(r=2, alpha=4, targets=["fc1", "fc2"]), init=init)
    assert model.configs["default"].init == "lora_ga"
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)  # identity at init (residual offset)
    grads = _mean_grads(Net())
    for path, adapter in model.adapter_modules("default").items():
        base = model.get_submodule(f"model.{path}").base
        assert torch.equal(base.weight, weights[path])  # the base weight is not modified
        a, b = lora_ga_factors(grads[path], 2, 2.0, scale_mode="unit")
        torch.testing.assert_close(adapter.A, a, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(adapter.B, b, atol=1e-4, rtol=1e-4)
    assert not any(w.requires_grad for w in (model.model.fc1.base_layer.weight, model.model.fc2.base_layer.weight))


def _first_step_cosine(lora_ga: bool, lr: float = 1e-3) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Toy regression y = x W*ᵀ on one Linear layer: cosine between the weight change of one SGD step on
    (A, B) and the full fine-tuning step −lr·G."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=g)  # 6 rows: G has rank <= 6, so svd_lowrank(q = 8) is exact
    y = x @ torch.randn(16, 16, generator=g).T
    init = pk.init.LoRAGA([(x, y)], loss_fn=mse, scale="unit") if lora_ga else None
    lin = nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, 16, generator=g) * 0.1)
    full = lin.weight.detach().clone().requires_grad_(True)
    loss = ((x @ full.T - y) ** 2).mean()
    (grad,) = torch.autograd.grad(loss, full)
    net = nn.Sequential(lin)
    cfg = pk.LoRAConfig(r=2, alpha=2, targets=["0"], seed=0)
    model = pk.adapt(net, cfg, init=init) if init else pk.adapt(net, cfg)
    adapter = model.adapter_modules("default")["0"]
    base = model.get_submodule("model.0").base
    before = adapter.delta_weight(base).detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    mse(model, (x, y)).backward()
    opt.step()
    step = (adapter.delta_weight(base) - before).detach()
    cos = torch.nn.functional.cosine_similarity(step.flatten(), -grad.flatten(), dim=0)
    return float(cos), step, grad


def test_first_step_approximates_the_full_gradient_step_better_than_random_init() -> None:
    cos_ga, step, grad = _first_step_cosine(lora_ga=True)
    cos_random, _, _ = _first_step_cosine(lora_ga=False)
    # with unit scale and s = 1, the first step moves W by -lr·rank_2r(G) up to O(lr²)
    u, s, vh = torch.linalg.svd(grad)
    rank_2r = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    torch.testing.assert_close(step / -1e-3, rank_2r, atol=1e-3 * float(s[0]), rtol=0)
    best = float(rank_2r.norm() / grad.norm())  # the best cosine any rank-4 step can reach
    assert cos_ga == pytest.approx(best, abs=1e-3)
    assert cos_ga > cos_random + 0.2, (cos_ga, cos_random)
    print(f"first-step cosine with the full-gradient step: LoRA-GA {cos_ga:.3f}, random init {cos_random:.3f}")


def test_bad_settings() -> None:
    with pytest.raises(InvalidConfigError, match="direction"):
        pk.init.LoRAGA([], direction="AB")
    with pytest.raises(InvalidConfigError, match="scale"):
        pk.init.LoRAGA([], scale="big")
    with pytest.raises(InvalidConfigError, match="2r"):
        lora_ga_factors(torch.randn(6, 4), 3, 1.0)
    net = Net()
    with pytest.raises(InvalidConfigError, match="no calibration batches"):
        pk.adapt(net, pk.LoRAConfig(r=2, targets=["fc1"]), init=pk.init.LoRAGA([], loss_fn=mse))
    assert not any(isinstance(m, pk.AdaptedModel) for m in net.modules())
    assert not hasattr(net.fc1, "base_layer")  # a failed init leaves the model as it was


@pytest.mark.parity
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # PEFT's own gradient-count hooks
@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("ArBr", "gd"), ("A2rBr", "unit")])
def test_parity_with_peft(direction: str, scale: str) -> None:
    peft = pytest.importorskip("peft")
    r, alpha = 2, 4
    base = Net()
    batches = _batches()
    theirs_net = copy.deepcopy(base)
    peft_scale = {"gd": "gd_scale", "weightS": "weight_svd"}.get(scale, scale)
    peft_cfg = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=["fc1", "fc2"],
        init_lora_weights="lora_ga",
        lora_ga_config=peft.LoraGAConfig(direction=direction, scale=peft_scale, stable_gamma=16),
    )

    def train_step() -> None:
        for batch in batches:
            mse(theirs_net, batch).backward()

    peft.preprocess_loraga(theirs_net, peft_cfg, train_step)
    theirs = peft.get_peft_model(theirs_net, peft_cfg)
    init = pk.init.LoRAGA(batches, loss_fn=mse, direction=direction, scale=scale, peft_compat=True)
    ours = pk.adapt(copy.deepcopy(base), pk.LoRAConfig(r=r, alpha=alpha, targets=["fc1", "fc2"]), init=init)
    x = batches[0][0]
    for path, adapter in ours.adapter_modules("default").items():
        layer = theirs.base_model.model.get_submodule(path)
        pa, pb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        sign_a = torch.sign((pa * adapter.A).sum(1))  # factors agree up to one sign per singular vector
        sign_b = torch.sign((pb * adapter.B).sum(0))
        torch.testing.assert_close(adapter.A * sign_a[:, None], pa, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(adapter.B * sign_b, pb, atol=1e-4, rtol=1e-4)
        # PEFT rewrites W in place; with PEFT's factors our frozen offset gives the same function
        adapter.set_factors(pa.detach(), pb.detach())
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the same training update on both
        for path, adapter in ours.adapter_modules("default").items():
            layer = theirs.base_model.model.get_submodule(path)
            noise = torch.randn(adapter.B.shape, generator=torch.Generator().manual_seed(2)) * 0.1
            adapter.B.add_(noise)
            layer.lora_B["default"].weight.add_(noise)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    with ours.adapters_disabled():  # ... but only ours still knows the true base (PEFT's disable gives W_res)
        torch.testing.assert_close(ours(x), base(x))


def test_conv2d_layers_use_the_flattened_kernel_gradient() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 6, 3))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(2, 3, 6, 6, generator=g), torch.randn(2, 6, 4, 4, generator=g)) for _ in range(2)]
    want = net(batches[0][0])
    ref = copy.deepcopy(net)
    for batch in batches:
        mse(ref, batch).backward()
    model = pk.adapt(net, pk.LoRAConfig(r=2, targets=["0", "2"]), init=pk.init.LoRAGA(batches, loss_fn=mse))
    torch.testing.assert_close(model(batches[0][0]), want, atol=1e-5, rtol=0)
    adapter = model.adapter_modules("default")["2"]
    grad = ref[2].weight.grad.reshape(6, -1) / len(batches)
    a, b = lora_ga_factors(grad, 2, 1.0)
    torch.testing.assert_close(adapter.A.reshape(2, -1), a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(adapter.B, b, atol=1e-4, rtol=1e-4)


def test_weight_scale_and_norm_clip() -> None:
    g = torch.Generator().manual_seed(3)
    grad, weight = torch.randn(10, 8, generator=g), 0.01 * torch.randn(10, 8, generator=g)
    unit_a, unit_b = lora_ga_factors(grad, 2, 4.0, scale_mode="unit")
    a, b = lora_ga_factors(grad, 2, 4.0, scale_mode="weightS", weight=weight)
    factor = float((torch.linalg.svdvals(weight)[:2] / 4.0).sqrt().mean())  # mean(√(σ_W[:r] / s))
    torch.testing.assert_close(a, unit_a * factor)
    torch.testing.assert_close(b, unit_b * factor)
    clipped_a, clipped_b = lora_ga_factors(grad, 2, 4.0, scale_mode="unit", weight=weight, norm_clip=True)
    assert float((4.0 * unit_b @ unit_a).abs().max()) > float(weight.abs().max())  # the clip applies here
    torch.testing.assert_close((4.0 * clipped_b @ clipped_a).abs().max(), weight.abs().max())
    ratio = clipped_a[0, 0] / unit_a[0, 0]
    torch.testing.assert_close(clipped_a, unit_a * ratio)  # same directions, one common factor
    torch.testing.assert_close(clipped_b, unit_b * ratio)
    with pytest.raises(InvalidConfigError, match="need the layer's weight"):
        lora_ga_factors(grad, 2, 4.0, norm_clip=True)


@pytest.mark.parity
@pytest.mark.parametrize("dropout", [0.1, 0.3])
def test_dropout_in_training_leaves_the_frozen_offset_undropped(dropout: float) -> None:
    """With dropout in training, ``y = W_res x + s·B A drop(x)`` (PEFT's LoRA-GA on its rewritten base): the
    frozen offset ``s·B₀A₀`` sees the undropped ``x``. Compared with a PEFT LoRA on ``W_res`` (same masks)."""
    pytest.importorskip("peft")
    base = Net()
    init = pk.init.LoRAGA(_batches(), loss_fn=mse)
    cfg = pk.LoRAConfig(r=2, alpha=4, targets=["fc1", "fc2"], dropout=dropout)
    ours = pk.adapt(copy.deepcopy(base), cfg, init=init)
    move_off_init(ours)
    pm = peft_lora_on_residual_base(base, ours, dropout)
    x = _batches()[0][0]
    assert_train_mode_parity(pm, ours, lambda m: m(x))
