"""Weight compressors whose error EoRA compensates: unstructured magnitude pruning, 2:4 semi-structured pruning
and k-bit quantisation with HQQ (Badri & Shaji, 2023, "Half-Quadratic Quantization of Large Machine Learning
Models"; the ``hqq`` package, optional: ``pip install peftkit[compress]``).

Each maps a weight ``W [out, in]`` to the weight the compressed model computes with, ``W_c`` of the same shape and
dtype. Quantised weights are returned dequantised (``W_c = dequant(quant(W))``): the model computes exactly what the
quantised model computes, while the storage saving is not realised by these functions; :func:`hqq_linear` builds
the stored form (hqq's ``HQQLinear`` with packed codes, which adapters use through :mod:`peftkit.core.quant`), and
``eora(..., quantized=True)`` compensates that layer's own dequantised weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from peftkit.compress.errors import CompressorError, check_fraction

Compressor = Callable[[Tensor], Tensor]
NAMES = ("magnitude", "2:4", "hqq4", "hqq3", "hqq2")


@torch.no_grad()
def magnitude_prune(weight: Tensor, sparsity: float) -> Tensor:
    """``W`` with its ``⌊sparsity · numel⌋`` smallest-magnitude entries set to zero (one threshold per layer,
    Han et al., 2015)."""
    check_fraction("sparsity", sparsity)
    flat = weight.detach().abs().reshape(-1)
    k = int(sparsity * flat.numel())
    out = weight.detach().clone()
    if k:
        out.view(-1)[flat.argsort()[:k]] = 0
    return out


@torch.no_grad()
def prune_2_4(weight: Tensor) -> Tensor:
    """2:4 semi-structured sparsity: in every group of 4 consecutive inputs of a row, the 2 smallest-magnitude
    entries are zero (``in`` must be a multiple of 4)."""
    out_f, in_f = weight.shape
    if in_f % 4:
        raise CompressorError(f"2:4 pruning needs in_features divisible by 4, got {in_f}")
    groups = weight.detach().reshape(out_f, in_f // 4, 4)
    drop = groups.abs().argsort(dim=-1)[..., :2]
    return groups.clone().scatter_(-1, drop, 0.0).reshape(out_f, in_f)


@torch.no_grad()
def hqq_quantize(weight: Tensor, bits: int, group_size: int = 64) -> Tensor:
    """``dequant(quant(W))`` with HQQ at ``bits`` bits, groups of ``group_size`` inputs (per output row), zero
    points and scales not re-quantised, the half-quadratic optimiser on (the ``hqq`` defaults for 4/3 bits)."""
    try:
        from hqq.core.quantize import Quantizer
    except ImportError as exc:
        raise CompressorError("quantising with HQQ needs the hqq package: pip install 'peftkit[compress]'") from exc
    w = weight.detach().float()
    group = group_size if w.shape[1] % group_size == 0 else w.shape[1]
    q, meta = Quantizer.quantize(
        w, nbits=bits, group_size=group, optimize=True, axis=1, compute_dtype=torch.float32, device=str(w.device)
    )
    return Quantizer.dequantize(q, meta).reshape(w.shape).to(weight.dtype)


@torch.no_grad()
def hqq_linear(linear: torch.nn.Linear, bits: int, group_size: int = 64) -> torch.nn.Module:
    """``linear`` quantised into hqq's ``HQQLinear`` (packed ``bits``-bit codes, groups of ``group_size`` inputs;
    ``linear`` is left as it was): a stored quantised base for adapters (:mod:`peftkit.core.quant` reads it)."""
    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    except ImportError as exc:
        raise CompressorError("quantising with HQQ needs the hqq package: pip install 'peftkit[compress]'") from exc
    group = group_size if linear.in_features % group_size == 0 else linear.in_features
    config = BaseQuantizeConfig(nbits=bits, group_size=group, axis=1)
    q = HQQLinear(linear, config, compute_dtype=linear.weight.dtype, device=str(linear.weight.device), del_orig=False)
    if q.bias is not None:  # hqq clones the bias with its autograd history; a frozen base holds a plain tensor
        q.bias = q.bias.detach()
    return q


def hqq_bits(name: str) -> int | None:
    """``K`` of a compressor name ``"hqqK"`` (else ``None``)."""
    return int(name[3:]) if name in NAMES and name.startswith("hqq") else None


def get(name: str, ratio: float | None = None) -> Compressor:
    """The compressor ``name`` (``"magnitude"`` takes the sparsity ``ratio``; ``"hqqK"`` quantises to K bits).

    Raises:
        CompressorError: an unknown name.
        RatioError: ``"magnitude"`` without a ratio in ``(0, 1)``.
    """
    if name == "magnitude":
        sparsity = check_fraction("the magnitude-pruning ratio", ratio)
        return lambda w: magnitude_prune(w, sparsity)
    if name == "2:4":
        return prune_2_4
    if name.startswith("hqq") and name[3:].isdigit() and name in NAMES:
        bits = int(name[3:])
        return lambda w: hqq_quantize(w, bits)
    raise CompressorError(f"unknown compressor {name!r}; known: {', '.join(NAMES)}")
