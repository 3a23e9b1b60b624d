"""GaLore (peftkit.optim.galore): parity with the official ``galore_torch.GaLoreAdamW`` (same gradients, hence the
same SVD projections), the projector refresh every ``update_proj_gap`` steps, the low-rank subspace of the update,
optimizer-state bytes against AdamW, the 8-bit state option, and bad input."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from peftkit.optim import GaLoreAdamW, GaLoreShapeError, OptimizerError, build_optimizer, galore_groups

M, N, R = 24, 16, 4  # one tall (right projector) and one wide (left projector) matrix


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tall = nn.Linear(N, M)  # weight [M, N], M >= N: right projector
        self.wide = nn.Linear(M, N - 4)  # weight [N-4, M], rows < cols: left projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wide(torch.tanh(self.tall(x)))


def model_and_data(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = TwoLayer()
    g = torch.Generator().manual_seed(seed + 1)
    return model, torch.randn(32, N, generator=g), torch.randn(32, N - 4, generator=g)


def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def official(params_groups: list[dict], **kw: object) -> torch.optim.Optimizer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        galore_torch = pytest.importorskip("galore_torch")
        return galore_torch.GaLoreAdamW(params_groups, no_deprecation_warning=True, **kw)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_galore_matches_official_galore_adamw(proj_type: str) -> None:
    """Seven steps with update_proj_gap=3 (projector refreshes at steps 0, 3, 6), scale 0.25, weight decay 0.1:
    the weights equal galore_torch.GaLoreAdamW's (which computes the same SVD of the same gradients)."""
    ours, x, y = model_and_data()
    ref, _, _ = model_and_data()
    opts = {"rank": R, "update_proj_gap": 3, "scale": 0.25, "proj_type": proj_type}

    def groups(model: nn.Module) -> list[dict]:
        mats = [model.tall.weight, model.wide.weight]
        vecs = [model.tall.bias, model.wide.bias]
        return [{"params": mats, **opts}, {"params": vecs}]

    kw = {"lr": 1e-2, "weight_decay": 0.1, "eps": 1e-6}
    train(ours, GaLoreAdamW(groups(ours), **kw), x, y, 7)
    train(ref, official(groups(ref), **kw), x, y, 7)
    moved = (ours.tall.weight - model_and_data()[0].tall.weight).abs().max()
    assert moved > 1e-3  # the comparison is about real updates
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6 * float(q.detach().abs().max()), msg=name)


def test_projector_refreshes_every_gap_steps_and_is_orthonormal() -> None:
    model, x, y = model_and_data()
    opt = GaLoreAdamW(galore_groups(model, rank=R, update_proj_gap=2, scale=1.0), lr=1e-2)
    train(model, opt, x, y, 5)  # steps 0..4: refreshes at 0, 2, 4
    tall, wide = opt.state[model.tall.weight], opt.state[model.wide.weight]
    assert tall["refreshes"] == wide["refreshes"] == 3
    assert (tall["side"], wide["side"]) == ("right", "left")
    eye = torch.eye(R)
    torch.testing.assert_close(tall["projector"] @ tall["projector"].T, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(wide["projector"].T @ wide["projector"], eye, atol=1e-5, rtol=0)
    assert tall["exp_avg"].shape == (M, R) and wide["exp_avg"].shape == (R, M)


def test_update_lies_in_the_projected_subspace() -> None:
    """Without weight decay, one step moves W only inside the projector's span: ``ΔW (I - PᵀP) = 0`` (right) and
    ``(I - PPᵀ) ΔW = 0`` (left); the update has rank <= r."""
    model, x, y = model_and_data()
    opt = GaLoreAdamW(galore_groups(model, rank=R, update_proj_gap=10, scale=1.0), lr=1e-2)
    before = [model.tall.weight.detach().clone(), model.wide.weight.detach().clone()]
    train(model, opt, x, y, 1)
    d_tall = model.tall.weight.detach() - before[0]
    d_wide = model.wide.weight.detach() - before[1]
    p_tall, p_wide = opt.state[model.tall.weight]["projector"], opt.state[model.wide.weight]["projector"]
    off_tall = d_tall @ (torch.eye(N) - p_tall.T @ p_tall)
    off_wide = (torch.eye(N - 4) - p_wide @ p_wide.T) @ d_wide
    assert off_tall.abs().max() < 1e-6 * d_tall.abs().max()
    assert off_wide.abs().max() < 1e-6 * d_wide.abs().max()
    assert torch.linalg.matrix_rank(d_tall) <= R and torch.linalg.matrix_rank(d_wide) <= R


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


@pytest.mark.parametrize(("m", "n", "r"), [(256, 128, 16), (128, 256, 16), (512, 512, 32)])
def test_state_bytes_at_rank_r_against_adamw(m: int, n: int, r: int) -> None:
    """Per m×n matrix at rank r (D = max(m, n), d = min(m, n)): moments 2·D·r and projector d·r float32
    elements, against AdamW's 2·m·n (+ its step counter). On the square layer this is within the issue's target
    r(m+n)/(2mn) + 0.05 of AdamW's bytes."""
    layer = nn.Linear(n, m, bias=False)
    galore = GaLoreAdamW([{"params": [layer.weight], "rank": r}], lr=1e-3)
    adam = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    for opt in (galore, adam):
        layer(torch.randn(8, n)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    big, small = max(m, n), min(m, n)
    assert galore.state_bytes() == state_bytes(galore) == 4 * (2 * big * r + small * r)
    assert state_bytes(adam) == 4 * (2 * m * n + 1)
    if m == n:
        assert galore.state_bytes() / state_bytes(adam) <= r * (m + n) / (2 * m * n) + 0.05


def test_eight_bit_state_option() -> None:
    """state_bits=8: projected moments in bitsandbytes' 8-bit blockwise format (1 byte each + one float32 absmax
    per 256-element block + the two 256-entry quantisation maps), and the first steps follow the float32 GaLore
    within the 8-bit quantisation error."""
    pytest.importorskip("bitsandbytes")
    m32, x, y = model_and_data()
    m8, _, _ = model_and_data()
    kw = {"rank": R, "update_proj_gap": 2, "scale": 1.0, "weight_decay": 0.0}
    o32 = build_optimizer("galore", m32, lr=1e-2, eps=1e-6, **kw)
    o8 = build_optimizer("galore", m8, lr=1e-2, eps=1e-6, state_bits=8, **kw)
    train(m32, o32, x, y, 3)
    train(m8, o8, x, y, 3)
    start = model_and_data()[0]
    for p32, p8, p0 in zip(m32.parameters(), m8.parameters(), start.parameters()):
        step = (p32 - p0).abs().max()
        assert (p8 - p32).abs().max() <= 0.05 * step
    state = o8.state[m8.tall.weight]
    assert state["state1"].dtype == torch.uint8 and state["state1"].shape == (M, R)
    per_param = 2 * M * R + 2 * 4 * 1 + 2 * 256 * 4 + 4 * R * N  # uint8 moments, absmax, qmaps, projector
    assert sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor)) == per_param


def test_bad_input_names_the_fix() -> None:
    vec = nn.Parameter(torch.zeros(5))
    with pytest.raises(GaLoreShapeError, match=r"shape \(5,\).*plain group"):
        GaLoreAdamW([{"params": [vec], "rank": 2}])
    with pytest.raises(OptimizerError, match="proj_type"):
        GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(3, 3))], "rank": 2, "proj_type": "diagonal"}])
    with pytest.raises(OptimizerError, match="rank must be a positive integer"):
        GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(3, 3))], "rank": 0}])
    only_vectors = nn.LayerNorm(4)
    with pytest.raises(GaLoreShapeError, match=r"none of the trainable parameters is a matrix.*another optimizer"):
        build_optimizer("galore", only_vectors, lr=1e-3, rank=2)
