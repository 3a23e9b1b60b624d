"""The quantisation backends peftkit reads (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, torchao ``NF4Tensor`` /
``Int8Tensor`` weights, hqq ``HQQLinear``): one small :class:`Backend` of functions each (shape, dequantise,
re-quantise in place, snapshot / restore, dtype, device). The core never imports a backend package: layers are
recognised by their class's and weight's ``__module__``, and a backend's functions are reached through the layer
itself or imported only once such a layer exists. Used by :mod:`peftkit.core.quant`."""

from __future__ import annotations

import copy
import importlib
import logging
import sys
import warnings
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from .errors import NotMergeableError

# Packages whose layers this file reads (matched on ``__module__`` prefixes, never imported here).
_MODULE_PACKAGES = ("bitsandbytes.", "hqq.")
_TENSOR_PACKAGES = ("torchao.",)

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
        # quantize() assigns W_q a plain tensor, which nn.Module refuses while W_q is a registered Parameter (as it
        # is after HQQLinear's own construction): unregistered meanwhile, the original parameter put back after
        registered = module._parameters.pop("W_q", None)
        try:
            module.quantize(weight.to(module.compute_dtype), **config)  # sets a new W_q and meta
            codes = module.W_q
        finally:
            module.__dict__.pop("W_q", None)
            if registered is not None:
                module._parameters["W_q"] = registered
        with torch.no_grad():
            w_q.copy_(codes)
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
