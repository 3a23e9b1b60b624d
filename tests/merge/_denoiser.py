"""A small UNet-like denoiser built here (``diffusers`` is not a dependency of these tests): a stem conv, a strided
down conv, a ``deep`` block (two convs: the part CMLoRA / DeepCache reuse), nearest upsampling, a skip concatenation
and an output conv; timestep (sinusoidal) and class embeddings (class ``classes`` = the empty / unconditional one)
added after the stem."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

import peftkit as pk

CONVS = ["inc", "down", "deep.conv1", "deep.conv2", "up"]


class Deep(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + self.conv2(F.silu(self.conv1(x)))


class TinyUNet(nn.Module):
    def __init__(self, ch: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.inc = nn.Conv2d(1, ch, 3, padding=1)
        self.temb = nn.Linear(16, ch)
        self.cemb = nn.Embedding(classes + 1, ch)
        self.down = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.deep = Deep(ch)
        self.up = nn.Conv2d(2 * ch, ch, 3, padding=1)
        self.out = nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-math.log(1000.0) * torch.arange(8, dtype=torch.float32) / 8)
        angles = t.float()[:, None] * freqs[None]
        emb = self.temb(torch.cat([angles.sin(), angles.cos()], 1)) + self.cemb(y)
        h = self.inc(x) + emb[:, :, None, None]
        d = self.deep(self.down(F.silu(h)))
        u = F.interpolate(d, scale_factor=2, mode="nearest")
        return self.out(F.silu(self.up(torch.cat([u, h], 1))))


def unet_with_loras(n: int, seed: int = 3, scale: float = 0.1) -> pk.AdaptedModel:
    """A TinyUNet with ``n`` rank-2 LoRAs ``c0 … c{n-1}`` on every conv and the timestep Linear, random values."""
    from _helpers import randomize

    torch.manual_seed(seed)
    base = TinyUNet()
    model: pk.AdaptedModel | None = None
    for i in range(n):
        config = pk.LoRAConfig(r=2, alpha=2.0, targets=[*CONVS, "temb"])
        if model is None:
            model = pk.adapt(base, config, f"c{i}")
        else:
            model.add_adapter(f"c{i}", config)
        randomize(model, f"c{i}", seed + 10 * i, scale)
    assert model is not None
    return model.eval()
