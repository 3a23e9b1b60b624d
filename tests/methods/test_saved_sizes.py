"""The saved file stores only what trains, and says so in its size (issue 5): random structures (RandLoRA's
bases, FourierFT's frequencies) are rebuilt from the saved seed and config, never written; SHiRA and PaCA
write their trainable values plus the indices that place them. The tensor bytes of ``adapter.safetensors``
are checked against each method's formula exactly."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import nn

import peftkit as pk

FP32, INT32, INT64 = 4, 4, 8


def tensor_bytes(folder: Path) -> tuple[int, dict[str, list[int]]]:
    """Bytes of tensor data in ``adapter.safetensors`` (file size − 8-byte length − JSON header), and shapes."""
    raw = (folder / "adapter.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    shapes = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    return len(raw) - 8 - header_len, shapes


def _two_layers(d: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))


def test_randlora_file_is_orders_of_magnitude_smaller_than_its_bases(tmp_path) -> None:
    d, r = 1024, 256
    model = pk.adapt(_two_layers(d), pk.get_config("randlora", r=r, targets=["0", "2"]), name="a")
    model.save(tmp_path / "r")
    saved, shapes = tensor_bytes(tmp_path / "r")
    n = -(-d // r)  # N = ceil(d_min / r) bases
    assert saved == 2 * (r * n + n * d) * FP32  # λ [r, N] and γ [N, d_min] per layer, nothing else
    assert sorted(k.rsplit(".", 1)[-1] for k in shapes) == ["gamma", "gamma", "lam", "lam"]
    a = model.adapter_modules("a")["0"]
    bases = a.A.numel() * a.A.element_size() + a.B.numel() * a.B.element_size()  # one shared set, counted once
    assert saved * 100 <= bases, (saved, bases)  # two orders of magnitude
    loaded = pk.load(_two_layers(d), tmp_path / "r")  # the bases come back from projection_prng_key
    assert torch.equal(loaded.adapter_modules("a")["0"].B, a.B) and torch.equal(loaded.adapter_modules("a")["2"].A, a.A)


def test_fourierft_file_is_the_spectrum_only(tmp_path) -> None:
    d, n = 256, 1000
    model = pk.adapt(_two_layers(d), pk.get_config("fourierft", n_frequency=n, targets=["0", "2"]), name="f")
    model.save(tmp_path / "f")
    saved, shapes = tensor_bytes(tmp_path / "f")
    assert saved == 2 * n * FP32 and all(s == [n] for s in shapes.values())  # locations rebuilt from the seed
    assert saved * 60 < 2 * d * d * FP32  # versus the dense ΔW it stands for
    loaded = pk.load(_two_layers(d), tmp_path / "f")
    assert torch.equal(loaded.adapter_modules("f")["2"].indices, model.adapter_modules("f")["2"].indices)


def test_shira_and_paca_files_are_values_plus_indices(tmp_path) -> None:
    d, r = 256, 4
    shira = pk.adapt(_two_layers(d), pk.get_config("shira", r=r, targets=["0", "2"], random_seed=1), name="s")
    shira.save(tmp_path / "s")
    n = r * (d + d)
    assert tensor_bytes(tmp_path / "s")[0] == 2 * (n * FP32 + 2 * n * INT32)  # values + (row, col) int32
    paca = pk.adapt(_two_layers(d), pk.get_config("paca", r=r, targets=["0", "2"]), name="p")
    paca.save(tmp_path / "p")
    assert tensor_bytes(tmp_path / "p")[0] == 2 * (d * r * FP32 + r * INT64)  # the r columns + their indices
