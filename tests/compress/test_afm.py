"""AFM: exact at full k, mean output preserved, reconstruction MSE = the dropped eigenvalues, parameter count,
embedding compression and its fusion into the next fully connected layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit.compress import afm, ctr
from peftkit.compress.arch import FactoredLinear
from peftkit.compress.errors import RankError, UnknownArchitectureError


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 10), nn.Linear(10, 6)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _inputs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 12, generator=g) @ torch.randn(12, 12, generator=g) for _ in range(n)]


def _outputs(module, data):
    with torch.no_grad():
        return torch.cat([module(x) for x in data]).double()


def test_full_rank_is_exact_and_mean_and_mse_follow_the_eigenvalues():
    torch.manual_seed(0)
    base, data = MLP(), _inputs()
    layer = base.fc1
    target = _outputs(layer, data)
    full = MLP()
    full.load_state_dict(base.state_dict())
    afm.afm(full, data, {"fc1": 10})
    torch.testing.assert_close(_outputs(full.fc1, data), target, rtol=0, atol=1e-5 * float(target.abs().max()))
    for k in (1, 3, 6):
        model = MLP()
        model.load_state_dict(base.state_dict())
        stats = afm.afm(model, data, {"fc1": k})["fc1"]
        assert isinstance(model.fc1, FactoredLinear) and model.fc1.rank == k
        approx = _outputs(model.fc1, data)
        torch.testing.assert_close(approx.mean(0), target.mean(0), rtol=0, atol=1e-5)  # E[ŷ] = μ
        eigenvalues = torch.linalg.eigvalsh(stats.covariance).flip(0)
        mse = float((approx - target).square().sum(1).mean())  # squared error per output row
        assert mse == pytest.approx(float(eigenvalues[k:].sum()), rel=1e-4)
        params = sum(p.numel() for p in model.fc1.parameters())
        assert params == afm.linear_params(12, 10, k)


def test_embedding_compression_and_fusion_into_the_next_layer():
    data, size = ctr.synthetic_clicks(512, fields=4, vocab=20)
    model = ctr.DeepFM(size, fields=4, dim=8, hidden=(16,))
    with torch.no_grad():
        model.embedding.weight.normal_()
    batches = [data.ids[i : i + 128] for i in range(0, 512, 128)]
    original = [model.embedding(b).detach() for b in batches]
    full = ctr.DeepFM(size, fields=4, dim=8, hidden=(16,))
    full.load_state_dict(model.state_dict())
    afm.afm(full, batches, {"embedding": 8})
    with torch.no_grad():
        torch.testing.assert_close(full.embedding(batches[0]), original[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(full(batches[1]), model(batches[1]), rtol=0, atol=1e-4)
    stats = afm.afm(model, batches, {"embedding": 3})["embedding"]
    compressed = model.embedding
    assert isinstance(compressed, afm.CompressedEmbedding) and compressed.codes.weight.shape == (size, 3)
    with torch.no_grad():
        rebuilt = torch.cat([compressed(b) for b in batches]).reshape(-1, 8).double()
        seen = torch.cat(original).reshape(-1, 8).double()
        torch.testing.assert_close(rebuilt.mean(0), seen.mean(0), rtol=0, atol=1e-5)  # frequency-weighted mean
        dropped = float(torch.linalg.eigvalsh(stats.covariance).flip(0)[3:].sum())
        assert float((rebuilt - seen).square().sum(1).mean()) == pytest.approx(dropped, rel=1e-4)
        fc = model.mlp[0]
        fused = afm.fuse(fc, compressed, fields=4)
        codes = compressed.codes(batches[0]).flatten(1)
        torch.testing.assert_close(fused(codes), fc(compressed(batches[0]).flatten(1)), rtol=0, atol=1e-5)
    assert fused.in_features == 4 * 3


def test_bad_input():
    with pytest.raises(RankError, match=r"\[1, 10\]"):
        afm.afm(MLP(), _inputs(), {"fc1": 11})
    with pytest.raises(UnknownArchitectureError, match=r"nn\.Linear, nn\.Embedding; fc is a ReLU"):
        afm.afm(_Relu(), _inputs(), {"fc": 1})


class _Relu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.ReLU()

    def forward(self, x):
        return self.fc(x)
