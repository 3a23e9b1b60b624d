"""Quantised frozen bases: how adapters see a bitsandbytes, torchao or hqq linear layer.

QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"; official code:
artidoro/qlora with bitsandbytes) trains adapters over a frozen base stored in 4 (or 8) bits. In peftkit that is
one more kind of :class:`~peftkit.core.base.BaseView`, not one layer class per method and backend: every method
sees the same canonical ``[out, in]`` linear layer.

* ``base(x)`` (the base output) runs the backend's own forward (its dequantise-and-matmul kernel);
* ``base.weight`` is the dequantised weight, computed on each access and never stored (keeping a float copy
  would give back the memory quantisation saves), for methods that need ``W`` (DoRA's norm, PiSSA's SVD, ...);
* ``base.apply(x, W')`` is ``F.linear``: the base operation of a quantised linear is a linear map;
* merging (the core writes through :meth:`QuantizedViewMixin.add_to_weight`) dequantises, adds ``ΔW`` and
  re-quantises with the layer's own settings; the re-quantisation error is measured and reported
  (:attr:`QuantizedViewMixin.merge_error`, :func:`merge_errors`, a :class:`QuantizedMergeWarning`). Unmerging
  is exact: the view keeps the quantised tensors as they were before each merge and restores them (merges made
  after the one taken back are re-applied on top), so merge + unmerge gives back the stored bytes.

Backends (each a small :class:`Backend` of functions; the core never imports them: modules are recognised by
their class's and weight's ``__module__``, and the backend's functions are reached through the module itself or
imported only once such a module exists, i.e. once the package is loaded anyway):

* bitsandbytes ``Linear4bit`` (nf4 / fp4, with or without double quantisation) and ``Linear8bitLt``;
* an ``nn.Linear`` whose weight is a torchao tensor subclass (``NF4Tensor``, int8 weight-only ``Int8Tensor``);
* hqq's ``HQQLinear`` (packed 2/3/4/8-bit).

A saved adapter's fingerprint records a quantised layer as the linear layer it quantises (kind ``linear``,
type ``Linear``, ``[out, in]``): an adapter trained over a 4-bit base loads onto the full-precision base and
back, as QLoRA adapters are used. (Inferred: the fingerprint protects against a different model, not against
a different storage of the same weights.)
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import NotMergeableError, UnsupportedLayerError
from .quant_backends import Backend, backend_of

logger = logging.getLogger("peftkit.quant")


class QuantizedMergeWarning(UserWarning):
    """Merging into a quantised base re-quantises ``W + ΔW``: the merged model differs from the adapted one by
    that rounding (see :func:`merge_errors`)."""


class MergeError(NamedTuple):
    """How much of a merge the re-quantisation lost, for one layer.

    Attributes:
        max_abs: ``max |Q(W + ΔW) − (W + ΔW)|`` (``W``: the dequantised weight before the merge).
        relative_to_delta: ``‖Q(W + ΔW) − (W + ΔW)‖_F / ‖ΔW‖_F``: the share of the update lost to rounding.
        relative_to_weight: ``‖Q(W + ΔW) − (W + ΔW)‖_F / ‖W + ΔW‖_F``.
    """

    max_abs: float
    relative_to_delta: float
    relative_to_weight: float


# --------------------------------------------------------------------------------------------------- view
@dataclass
class _Merged:
    key: Tensor  # the delta (or sparse values) tensor the core passed: unmerge hands back the same object
    delta: Tensor
    delta_bias: Tensor | None
    saved: Any  # backend snapshot before this merge
    bias: Tensor | None  # bias before this merge


class QuantizedViewMixin:
    """The behaviour of :class:`~peftkit.core.base.QuantizedView` (the ``BaseView`` of a quantised linear): see
    the module docstring. Kept free of ``BaseView`` so the core's import graph stays a tree (``base`` imports
    this file; this file imports nothing of ``base``)."""

    module: Any
    kind: Any
    transposed: bool
    in_features: int
    out_features: int
    weight_shape: tuple[int, ...]
    backend: Backend
    merge_error: MergeError | None

    def __init__(self, module: nn.Module) -> None:
        backend = backend_of(module)
        if backend is None:
            raise TypeError(f"a {type(module).__name__} is not a quantised linear layer")
        backend.prepare(module)
        self.module = module
        self.backend = backend
        self.kind = "linear"
        self.transposed = False
        self.out_features, self.in_features = backend.shape(module)
        self.weight_shape = (self.out_features, self.in_features)
        self.merge_error = None
        self._merged: list[_Merged] = []
        self._writes = 0  # merges and take-backs so far: re-quantising writes the backend's inner tensors in place

    # ----------------------------------------------------------------------------------------------- reading
    @property
    def weight(self) -> Tensor:
        """The dequantised weight ``[out, in]``: a new tensor on every access (not a view: writes are lost)."""
        with torch.no_grad():
            return self.backend.dequantize(self.module).to(self.dtype)

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def dtype(self) -> torch.dtype:
        return self.backend.dtype(self.module)

    @property
    def device(self) -> torch.device:
        return self.backend.device(self.module)

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return ()

    def weight_version(self) -> tuple[object, ...]:
        """Changes with every merge and unmerge (the backends' own tensors do not bump a version peftkit can
        read: torchao re-quantises into its inner tensors, hqq has no ``weight``), and with ``.to()``."""
        return (id(self.module), self._writes, self.dtype, self.device)

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """``F.linear(x, weight, bias)``: the base operation with another (float) weight."""
        return F.linear(x, weight, bias)

    def conv_like(self, in_channels: int, out_channels: int, *, kernel: bool) -> nn.Conv2d:
        raise UnsupportedLayerError("a quantised linear layer has no convolution geometry")

    def describe(self) -> dict[str, object]:
        """The layer it quantises (see the module docstring): ``{"kind": "linear", "type": "Linear", "shape"}``."""
        return {"kind": "linear", "type": "Linear", "shape": list(self.weight_shape)}

    # ----------------------------------------------------------------------------------------------- writing
    @torch.no_grad()
    def add_to_weight(self, delta: Tensor, delta_bias: Tensor | None = None, *, sign: float = 1.0) -> None:
        """Merge (``sign > 0``): dequantise, add ``delta``, re-quantise with the layer's settings; the rounding is
        kept in :attr:`merge_error`. Unmerge (``sign < 0``): ``delta`` must be a tensor merged before (the core
        passes back the one it stored); the quantised state from before its merge is restored exactly and the
        later merges are re-applied. Only the core calls this.

        Raises:
            NotMergeableError: subtracting a delta that was never merged into this layer (re-quantising
                ``W − ΔW`` would not give back the stored weight), or a torchao format peftkit cannot re-quantise.
        """
        if sign > 0:
            self._merge(delta, delta, delta_bias, warn=True)
        else:
            self._take_back(delta)

    @torch.no_grad()
    def add_to_entries(self, positions: tuple[Tensor, ...], values: Tensor, *, sign: float = 1.0) -> None:
        """A sparse delta (``W[positions] += values``), merged as the dense delta it is (re-quantising touches
        whole blocks anyway)."""
        if sign > 0:
            dense = torch.zeros(self.weight_shape, dtype=torch.float32, device=values.device)
            dense[positions] = values.float()
            self._merge(values, dense, None, warn=True)
        else:
            self._take_back(values)

    def _merge(self, key: Tensor, delta: Tensor, delta_bias: Tensor | None, *, warn: bool) -> None:
        module, backend = self.module, self.backend
        bias = self.bias
        if delta_bias is not None and bias is None:
            raise RuntimeError("cannot add a bias delta to a module without a bias")
        saved = backend.snapshot(module)
        target = backend.dequantize(module).float() + delta.float()
        backend.requantize(module, target.to(self.dtype))
        self._writes += 1
        err = backend.dequantize(module).float() - target
        lost = float(err.norm())
        self.merge_error = MergeError(
            max_abs=float(err.abs().max()) if err.numel() else 0.0,
            relative_to_delta=lost / max(float(delta.float().norm()), 1e-30),
            relative_to_weight=lost / max(float(target.norm()), 1e-30),
        )
        old_bias = None
        if delta_bias is not None and bias is not None:
            old_bias = bias.detach().clone()
            bias.copy_((bias.float() + delta_bias.float()).to(bias.dtype))
        self._merged.append(_Merged(key, delta, delta_bias, saved, old_bias))
        if warn:
            logger.info("merged into a quantised %s layer: re-quantisation error %s", backend.name, self.merge_error)
            warnings.warn(
                "merging into a quantised base re-quantises W + ΔW, so the merged model differs from the adapted "
                "one by that rounding; peftkit.core.quant.merge_errors(model) gives it per layer",
                QuantizedMergeWarning,
                stacklevel=4,
            )

    def _take_back(self, key: Tensor) -> None:
        at = next((i for i, m in enumerate(self._merged) if m.key is key), None)
        if at is None:
            raise NotMergeableError(
                "only a delta merged into this quantised layer can be taken out again (subtracting and "
                "re-quantising would not restore the stored weight): use AdaptedModel.unmerge()"
            )
        entry, later = self._merged[at], self._merged[at + 1 :]
        del self._merged[at:]
        self.backend.restore(self.module, entry.saved)
        self._writes += 1
        if entry.bias is not None:
            self.bias.copy_(entry.bias)  # type: ignore[union-attr]
        for m in later:  # merges made after this one, re-applied on top (deterministic: same bytes as before)
            self._merge(m.key, m.delta, m.delta_bias, warn=False)
        if not self._merged:
            self.merge_error = None


def merge_errors(model: nn.Module) -> dict[str, MergeError]:
    """``{module path: MergeError}`` of every quantised layer of ``model`` with something merged into it (how much
    of the merged update the re-quantisation lost)."""
    out = {}
    for path, view in _views(model):
        if view.merge_error is not None:
            out[path] = view.merge_error
    return out


def _views(model: nn.Module) -> Iterator[tuple[str, QuantizedViewMixin]]:
    for path, module in model.named_modules():
        view = getattr(module, "base", None)
        if isinstance(view, QuantizedViewMixin):
            yield path, view


def quantization_error(module: nn.Module, reference: Tensor) -> float:
    """``‖deq(Q(W)) − W‖_F / ‖W‖_F`` of a quantised layer against its full-precision weight ``reference`` (the
    scale the tests state their tolerances in)."""
    backend = backend_of(module)
    if backend is None:
        raise TypeError(f"a {type(module).__name__} is not a quantised linear layer")
    with torch.no_grad():
        w = backend.dequantize(module).float()
    return (
        float((w - reference.float()).norm()) / max(float(reference.float().norm()), 1e-30) if w.numel() else math.nan
    )
