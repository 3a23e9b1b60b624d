"""Point-PEFT spec properties on a small Point-MAE-like encoder built in code: shapes, prompt tokens removed
from every block's output, propagation weights summing to 1, parameter count, training through the adapter,
save/load."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import peftkit as pk
from peftkit.methods.pointpeft import PointPEFTConfig, farthest_points, interpolation_weights


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, -1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), Attention(d, heads)
        self.norm2, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PointEncoder(nn.Module):
    """Points ``[B, N, 3]`` → groups (FPS centres + k-NN) → mini-PointNet tokens + centre embedding + cls →
    pre-LN blocks → class logits."""

    def __init__(self, d: int = 24, groups: int = 8, group_size: int = 6, depth: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.groups, self.group_size = groups, group_size
        self.point_net = nn.Sequential(nn.Linear(3, d), nn.ReLU(), nn.Linear(d, d))
        self.pos = nn.Sequential(nn.Linear(3, d), nn.GELU(), nn.Linear(d, d))
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, 4) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, points: Tensor) -> Tensor:
        centres_idx = farthest_points(points, self.groups)
        centres = points.gather(1, centres_idx[..., None].expand(-1, -1, 3))
        nb = torch.cdist(centres, points).topk(self.group_size, largest=False)[1]
        local = points.gather(1, nb.reshape(points.shape[0], -1)[..., None].expand(-1, -1, 3))
        local = local.view(points.shape[0], self.groups, self.group_size, 3) - centres[:, :, None]
        tokens = self.point_net(local).max(dim=2).values + self.pos(centres)
        x = torch.cat([self.cls.expand(points.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


def _encoder() -> PointEncoder:
    torch.manual_seed(0)
    return PointEncoder().eval()


def _points(b: int = 3) -> Tensor:
    return torch.randn(b, 64, 3, generator=torch.Generator().manual_seed(1))


def test_prompts_removed_after_every_block_and_count() -> None:
    model = pk.adapt(_encoder(), PointPEFTConfig(num_prompts=4))
    assert model.layer_paths["default"] == ["blocks.0", "blocks.1", "blocks.2"]
    shapes: list[tuple[int, ...]] = []
    hooks = [b.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape))) for b in model.model.blocks]
    out = model(_points())
    for h in hooks:
        h.remove()
    assert out.shape == (3, 5) and shapes == [(3, 9, 24)] * 3  # cls + 8 group tokens: no prompt token left
    d, h = 24, 16
    assert model.trainable_parameters().trainable == 3 * (4 * d + 2 * (2 * d * h + h + d) + d * d + d)


def test_prompts_reach_the_attention() -> None:
    """Moving only the prompt tokens changes the cls output: they take part in the block's attention."""
    model = pk.adapt(_encoder(), PointPEFTConfig(num_prompts=4)).eval()
    with torch.no_grad():
        before = model(_points())
        for a in model.adapter_modules("default").values():
            a.prompts.add_(1.0)
        assert not torch.allclose(model(_points()), before)


def test_propagation_weights_sum_to_one() -> None:
    g = torch.Generator().manual_seed(2)
    tokens, centres = torch.randn(2, 10, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    idx, weights = interpolation_weights(tokens, centres)
    assert idx.shape == (2, 10, 3) and (weights > 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 10))
    dist = torch.cdist(tokens, centres)
    nearest = dist.argmin(-1)
    assert torch.equal(idx[..., 0], nearest) and (weights[..., 0] >= weights[..., 1]).all()


def test_farthest_points_are_spread() -> None:
    pts = torch.tensor([[[0.0], [0.1], [10.0], [5.0], [0.2]]])
    assert farthest_points(pts, 3).tolist() == [[0, 2, 3]]


def test_trains_and_roundtrips(tmp_path) -> None:
    model = pk.adapt(_encoder(), PointPEFTConfig(num_prompts=2, prompt_dropout=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([0, 3, 1])
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(_points()), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is None for p in model.get_base_model().parameters() if not p.requires_grad)
    model.eval()
    model.save(tmp_path / "pp")
    loaded = pk.load(_encoder(), tmp_path / "pp").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(_points()), model(_points()), rtol=0, atol=0)
