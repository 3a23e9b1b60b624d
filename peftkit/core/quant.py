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

import copy
import importlib
import logging
import math
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import NotMergeableError, UnsupportedLayerError

logger = logging.getLogger("peftkit.quant")

# Packages whose layers this file reads (matched on ``__module__`` prefixes, never imported here).
_MODULE_PACKAGES = ("bitsandbytes.", "hqq.")
_TENSOR_PACKAGES = ("torchao.",)


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


# Loggers that print at import time: bitsandbytes' CPU backend tries to fetch a kernel from the Hub and logs the
# failure offline (through the ``kernels`` package), torchao logs the CUDA extensions it cannot load, torch's pytree
# warns about torchao's enum registration.
_NOISY_LOGGERS = ("bitsandbytes", "kernels", "torchao", "torch.utils._pytree", "hqq")


def import_backend(name: str) -> ModuleType:
    """``import name`` (``"bitsandbytes"``, ``"torchao"``, ``"hqq.core.quantize"``, ...) with the backends' import-time
    log lines and warnings silenced (offline, bitsandbytes reports a failed kernel download on every import; the
    fallback it then uses is the PyTorch one, which is what peftkit runs anyway). For the code that creates
    quantised layers or 8-bit optimizer states; reading an existing layer never needs it.

    Raises:
        ModuleNotFoundError: the backend is not installed (the message names ``pip install 'peftkit[quant]'``).
    """
    if name in sys.modules:
        return sys.modules[name]
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        package = name.split(".")[0]
        if exc.name is not None and exc.name.split(".")[0] != package:
            raise
        raise ModuleNotFoundError(
            f"{package} is not installed: pip install 'peftkit[quant]' (bitsandbytes, torchao, hqq)", name=package
        ) from None
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# ----------------------------------------------------------------------------------------------- backends
class Backend:
    """How peftkit reads and writes one quantised storage format (functions of the module, no state)."""

    name = ""

    def shape(self, module: Any) -> tuple[int, int]:
        """``(out, in)`` of the layer."""
        return int(module.out_features), int(module.in_features)

    def prepare(self, module: Any) -> None:
        """Bring the module into the state the other functions read (called once, when the view is built)."""

    def dequantize(self, module: Any) -> Tensor:
        """The weight as a float tensor ``[out, in]``."""
        raise NotImplementedError

    def requantize(self, module: Any, weight: Tensor) -> None:
        """Quantise ``weight`` with the module's own settings and store it in the module, in place (the stored
        tensors keep their identity, so references to the parameters stay valid)."""
        raise NotImplementedError

    def snapshot(self, module: Any) -> Any:
        """A copy of the quantised state, for :meth:`restore`."""
        raise NotImplementedError

    def restore(self, module: Any, saved: Any) -> None:
        """Put back exactly the state :meth:`snapshot` copied."""
        raise NotImplementedError

    def dtype(self, module: Any) -> torch.dtype:
        """The float dtype the layer computes in (adapters are built in it)."""
        raise NotImplementedError

    def device(self, module: Any) -> torch.device:
        raise NotImplementedError


def _backend_module(name: str) -> Any:
    """A backend's submodule, imported when a layer of that backend is in hand (so the package is loaded)."""
    return importlib.import_module(name)


class _Bnb4bit(Backend):
    """bitsandbytes ``Linear4bit``: a ``Params4bit`` of packed nibbles with its ``QuantState`` (blocksize, nf4/fp4,
    absmax, nested absmax with double quantisation)."""

    name = "bitsandbytes-4bit"

    def prepare(self, module: Any) -> None:
        # On CPUs with AVX512-BF16, bnb's no-grad eval forward repacks the weight in place into a CPU layout and
        # computes in bfloat16; its own dequantize_4bit and the training forward then misread the weight
        # (measured with bnb 0.50.2: dequantised weight off by 0.18, next training forward raises). Adapted layers
        # stay on the float path, and a weight already repacked is unpacked.
        functional = _backend_module("bitsandbytes.functional")
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            data, state = functional._convert_weight_packed_for_cpu_inverse(module.weight.data, state)
            module.weight.data = data
            module.weight.quant_state = state
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False

    def shape(self, module: Any) -> tuple[int, int]:
        out, in_ = module.weight.quant_state.shape
        return int(out), int(in_)

    def dequantize(self, module: Any) -> Tensor:
        functional = _backend_module("bitsandbytes.functional")
        return functional.dequantize_4bit(module.weight.data, module.weight.quant_state)

    def requantize(self, module: Any, weight: Tensor) -> None:
        functional = _backend_module("bitsandbytes.functional")
        w = module.weight
        state = w.quant_state
        packed, new_state = functional.quantize_4bit(
            weight.to(state.dtype).contiguous(),
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            quant_storage=w.dtype,
        )
        with torch.no_grad():
            w.copy_(packed.view(w.shape))
        w.quant_state = new_state

    def snapshot(self, module: Any) -> Any:
        # (requantize replaces the QuantState object, never mutates it: keeping the reference is a copy)
        return module.weight.detach().clone(), module.weight.quant_state

    def restore(self, module: Any, saved: Any) -> None:
        data, state = saved
        with torch.no_grad():
            module.weight.copy_(data)
        module.weight.quant_state = state

    def dtype(self, module: Any) -> torch.dtype:
        return module.weight.quant_state.dtype

    def device(self, module: Any) -> torch.device:
        return module.weight.device


class _Bnb8bit(Backend):
    """bitsandbytes ``Linear8bitLt`` (LLM.int8(), inference weights): int8 rows ``CB`` with per-row absmax ``SCB``,
    ``W = CB · SCB / 127``. ``SCB`` sits on the weight until the first forward moves it to ``module.state``."""

    name = "bitsandbytes-8bit"

    @staticmethod
    def _scb(module: Any) -> Tensor:
        scb = getattr(module.weight, "SCB", None)
        return scb if scb is not None else module.state.SCB

    def dequantize(self, module: Any) -> Tensor:
        return module.weight.data.float() * (self._scb(module).float().unsqueeze(1) / 127.0)

    def requantize(self, module: Any, weight: Tensor) -> None:
        functional = _backend_module("bitsandbytes.functional")
        # as Int8Params quantises (through float16), so a merged layer is what bnb would have made of W + ΔW
        cb, scb, _ = functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
        with torch.no_grad():
            module.weight.copy_(cb)
            self._scb(module).copy_(scb)

    def snapshot(self, module: Any) -> Any:
        return module.weight.detach().clone(), self._scb(module).clone()

    def restore(self, module: Any, saved: Any) -> None:
        data, scb = saved
        with torch.no_grad():
            module.weight.copy_(data)
            self._scb(module).copy_(scb)

    def dtype(self, module: Any) -> torch.dtype:
        bias = getattr(module, "bias", None)
        return bias.dtype if bias is not None else torch.float32

    def device(self, module: Any) -> torch.device:
        return module.weight.device


class _TorchAO(Backend):
    """An ``nn.Linear`` whose weight is a torchao tensor subclass (``NF4Tensor``; weight-only ``Int8Tensor``); its
    forward dispatches ``F.linear`` to torchao's kernels. Re-quantising rebuilds the tensor with the same block
    sizes / granularity and copies its inner tensors in place."""

    name = "torchao"

    def shape(self, module: Any) -> tuple[int, int]:
        out, in_ = module.weight.shape
        return int(out), int(in_)

    def dequantize(self, module: Any) -> Tensor:
        w = module.weight
        if hasattr(w, "get_original_weight"):  # NF4Tensor
            return w.get_original_weight()
        return w.dequantize()

    @staticmethod
    def _inner(w: Tensor) -> list[str]:
        names, _ = w.__tensor_flatten__()  # type: ignore[attr-defined]
        return [n for n in names if isinstance(getattr(w, n, None), Tensor)]

    def _quantize_like(self, w: Any, weight: Tensor) -> Any:
        kind = type(w)
        if hasattr(w, "get_original_weight") and hasattr(w, "scaler_block_size"):  # NF4Tensor
            return kind.from_tensor(weight.to(w.dtype), w.block_size, w.scaler_block_size)
        if hasattr(kind, "from_hp") and hasattr(w, "block_size"):  # Int8Tensor (per-row or per-tensor scales)
            granularity = _backend_module("torchao.quantization.granularity")
            block = list(w.block_size)
            if block == [1, w.shape[1]]:
                return kind.from_hp(weight.to(w.dtype), granularity.PerRow())
            if block == list(w.shape):
                return kind.from_hp(weight.to(w.dtype), granularity.PerTensor())
        raise NotMergeableError(
            f"peftkit reads torchao's {kind.__name__} but cannot re-quantise it (block size "
            f"{getattr(w, 'block_size', '?')}): merge into a dequantised copy of the model instead"
        )

    def requantize(self, module: Any, weight: Tensor) -> None:
        w = module.weight
        new = self._quantize_like(w, weight)
        with torch.no_grad():
            for name in self._inner(w):
                getattr(w, name).copy_(getattr(new, name))

    def snapshot(self, module: Any) -> Any:
        w = module.weight
        return {name: getattr(w, name).clone() for name in self._inner(w)}

    def restore(self, module: Any, saved: Any) -> None:
        w = module.weight
        with torch.no_grad():
            for name, value in saved.items():
                getattr(w, name).copy_(value)

    def dtype(self, module: Any) -> torch.dtype:
        return module.weight.dtype

    def device(self, module: Any) -> torch.device:
        return module.weight.device


class _HQQ(Backend):
    """hqq's ``HQQLinear`` (Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models", 2023):
    packed ``W_q`` with per-group scale / zero in ``meta``; ``dequantize()`` gives ``W`` in ``compute_dtype``."""

    name = "hqq"

    def prepare(self, module: Any) -> None:
        # HQQLinear clones the float bias with its autograd history (a non-leaf that requires grad): a frozen base
        # tensor like any other here (and deepcopy, which refuses non-leaves, works again)
        bias = getattr(module, "bias", None)
        if isinstance(bias, Tensor) and bias.grad_fn is not None:
            module.bias = bias.detach()

    def dequantize(self, module: Any) -> Tensor:
        return module.dequantize()

    def requantize(self, module: Any, weight: Tensor) -> None:
        w_q = module.W_q
        config = {k: module.quant_config[k] for k in ("weight_quant_params", "scale_quant_params", "zero_quant_params")}
        module.quantize(weight.to(module.compute_dtype), **config)  # sets a new W_q and meta
        with torch.no_grad():
            w_q.copy_(module.W_q)
        module.W_q = w_q  # the original parameter, now holding the new codes

    def snapshot(self, module: Any) -> Any:
        meta = {k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in module.meta.items()}
        return module.W_q.detach().clone(), meta

    def restore(self, module: Any, saved: Any) -> None:
        data, meta = saved
        with torch.no_grad():
            module.W_q.copy_(data)
        module.meta = meta

    def dtype(self, module: Any) -> torch.dtype:
        return module.compute_dtype

    def device(self, module: Any) -> torch.device:
        return module.W_q.device


_BNB4, _BNB8, _TORCHAO, _HQQ_BACKEND = _Bnb4bit(), _Bnb8bit(), _TorchAO(), _HQQ()
# class name in the backend package -> backend (found anywhere in the module class's MRO)
_BY_CLASS = {"Linear4bit": _BNB4, "Linear8bitLt": _BNB8, "HQQLinear": _HQQ_BACKEND}


def backend_of(module: nn.Module) -> Backend | None:
    """The backend that stores ``module``'s weight quantised, or ``None`` for a plain layer. Recognised by names
    (class ``__module__`` / ``__name__``, the weight tensor's class), so no backend is imported to ask."""
    kind = type(module)
    if kind.__module__.startswith(_MODULE_PACKAGES):
        for klass in kind.__mro__:
            if klass.__module__.startswith(_MODULE_PACKAGES) and klass.__name__ in _BY_CLASS:
                return _BY_CLASS[klass.__name__]
        return None
    if isinstance(module, nn.Linear):
        weight = module._parameters.get("weight")
        if weight is not None and type(weight).__module__.startswith(_TENSOR_PACKAGES):
            return _TORCHAO
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a quantised linear layer peftkit adapts through :class:`QuantizedViewMixin`."""
    return backend_of(module) is not None


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
