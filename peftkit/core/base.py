"""``BaseView``: how adapters see the frozen module they adapt.

An adapter never touches the wrapped module directly. It reads the base weight in one canonical layout,
``[out_features, in_features, *kernel]``, whatever the module stores, and it can run the base operation
with a weight of its choice. Only the core writes through a view (merge / unmerge).

Canonical layouts:

* ``nn.Linear``: ``weight`` as stored, ``[out, in]``.
* transformers' GPT-2 ``Conv1D``: stored ``[in, out]``; the view shows its transpose (this is PEFT's
  ``fan_in_fan_out``; here no method needs to know about it).
* ``nn.Embedding``: a lookup is a product with a one-hot vector, so ``in = num_embeddings`` and
  ``out = embedding_dim``; the view shows ``weight.T`` (``[dim, vocab]``).
* ``nn.Conv2d``: ``[out, in/groups, kh, kw]`` as stored.
* any other ``nn.Module`` (kind ``"module"``: a whole MLP, block or norm, for block-level adapters such as
  parallel bottleneck adapters): no weight. ``in_features`` / ``out_features`` are the input width of its first
  and the output width of its last weight layer (Linear, Conv1D, Conv2d, Embedding) or LayerNorm; adapters get
  ``x`` = the module's first input and ``base_out`` = its output (a tensor, or the first element of a tuple
  output such as HF attention's ``(output, weights)``; the other elements pass through).
* a quantised linear (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, hqq ``HQQLinear``, an ``nn.Linear`` with a
  torchao weight): :class:`QuantizedView`, ``[out, in]`` dequantised on access; see :mod:`peftkit.core.quant`.
"""

from __future__ import annotations

from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .quant import QuantizedViewMixin
from .quant_backends import is_quantized

LayerKind = Literal["linear", "conv2d", "embedding", "module"]


def _hf_conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional at run time
        return None
    return Conv1D


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The kind of a module peftkit can wrap, or ``None`` if it cannot wrap it."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    conv1d = _hf_conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return "linear"
    if is_quantized(module):  # hqq's HQQLinear is no nn.Linear
        return "linear"
    return None


def _widths(view: BaseView) -> tuple[int, int]:
    return view.in_features, view.out_features


class BaseView:
    """Read access to a wrapped module's weight, shape and operation.

    ``BaseView(module)`` gives a :class:`ModuleView` for a module that is not one of the weight layers (the
    ``"module"`` kind), so every caller builds views the same way.

    Args:
        module: the frozen base module (``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding`` or HF ``Conv1D``).
    """

    kind: LayerKind
    transposed: bool
    in_features: int
    out_features: int
    weight_shape: tuple[int, ...]

    def __new__(cls, module: nn.Module | None = None) -> BaseView:
        # (module is None when copy/pickle rebuild an instance: keep its class)
        if cls is BaseView and module is not None:
            if is_quantized(module):
                return super().__new__(QuantizedView)
            if layer_kind(module) is None:
                return super().__new__(ModuleView)
        return super().__new__(cls)

    def __init__(self, module: nn.Module) -> None:
        kind = layer_kind(module)
        self.module: Any = module  # one of the layer kinds above (typed Any: nn.Module attributes are dynamic)
        if kind is None:
            raise TypeError(f"a {type(module).__name__} is not a weight layer: use ModuleView")
        self.kind = kind
        self.transposed = kind == "embedding" or (kind == "linear" and not isinstance(module, nn.Linear))
        stored = cast(Tensor, module.weight)
        shape: tuple[int, ...] = tuple(stored.T.shape if self.transposed else stored.shape)
        self.out_features = shape[0]
        self.in_features = shape[1] if kind != "conv2d" else shape[1] * int(cast(int, module.groups))
        self.weight_shape = shape

    # ----------------------------------------------------------------------------------------------- reading
    @property
    def weight(self) -> Tensor:
        """The frozen weight in canonical ``[out, in, *kernel]`` layout (a view, never a copy)."""
        w = self.module.weight
        return w.T if self.transposed else w

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def dtype(self) -> torch.dtype:
        return self.module.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.module.weight.device

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[2:])

    def weight_version(self) -> tuple[object, ...]:
        """A key that changes whenever the stored weight does (merge, unmerge, in-place writes, ``.to()``): what an
        adapter compares to keep values computed from :attr:`weight` cached (DoRA's frozen column norms)."""
        w = self.module.weight
        return (w.data_ptr(), w._version, w.dtype, w.device)

    def __call__(self, x: Tensor) -> Tensor:
        """The base module's own forward."""
        return self.module(x)

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """Run the base operation with ``weight`` (canonical layout) instead of the stored one.

        For a convolution this keeps the base stride, padding, dilation and groups; for an embedding it
        keeps ``padding_idx`` and ``max_norm`` semantics of the lookup (``x`` holds ids).
        """
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        if self.kind == "conv2d":
            m = self.module
            if m.padding_mode != "zeros":
                x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
                return F.conv2d(x, weight, bias, m.stride, 0, m.dilation, m.groups)
            return F.conv2d(x, weight, bias, m.stride, m.padding, m.dilation, m.groups)
        m = self.module
        out = F.embedding(x, weight.T, m.padding_idx, None, m.norm_type, m.scale_grad_by_freq, m.sparse)
        return out if bias is None else out + bias

    def conv_like(self, in_channels: int, out_channels: int, *, kernel: bool) -> nn.Conv2d:
        """A fresh ``nn.Conv2d`` with the base geometry (``kernel=True``) or a 1x1 conv (``kernel=False``)."""
        m = self.module
        if kernel:
            return nn.Conv2d(
                in_channels,
                out_channels,
                m.kernel_size,
                m.stride,
                m.padding,
                m.dilation,
                bias=False,
                padding_mode=m.padding_mode,
            )
        return nn.Conv2d(in_channels, out_channels, 1, bias=False)

    # ----------------------------------------------------------------------------------------------- writing
    @torch.no_grad()
    def add_to_weight(self, delta: Tensor, delta_bias: Tensor | None = None, *, sign: float = 1.0) -> None:
        """``W += sign * delta`` (computed in float32, cast back). Only the core calls this, to (un)merge."""
        w = self.module.weight
        d = delta.T if self.transposed else delta
        w.copy_((w.float() + sign * d.float()).to(w.dtype))
        if delta_bias is not None:
            b = self.module.bias
            if b is None:
                raise RuntimeError("cannot add a bias delta to a module without a bias")
            b.copy_((b.float() + sign * delta_bias.float()).to(b.dtype))

    @torch.no_grad()
    def add_to_entries(self, positions: tuple[Tensor, ...], values: Tensor, *, sign: float = 1.0) -> None:
        """``W[positions] += sign * values`` (canonical layout; float32, cast back, as :meth:`add_to_weight`).
        ``positions`` must not repeat an entry. Only the core calls this, to (un)merge a sparse delta."""
        w = self.module.weight
        view = w.T if self.transposed else w  # a view: writes land in the stored weight
        current = view[positions].float()
        view[positions] = (current + sign * values.float()).to(w.dtype)

    def describe(self) -> dict[str, object]:
        """Kind and shape, as recorded in a saved adapter's base-model fingerprint."""
        return {"kind": self.kind, "type": type(self.module).__name__, "shape": list(self.weight_shape)}


class ModuleView(BaseView):
    """A view of a weightless ``"module"`` (a whole MLP, block or norm; see the module docstring): widths from
    its weight layers, nothing to run with another weight or to merge into.

    Raises:
        UnsupportedLayerError: the module has no weight layer (or LayerNorm) to read widths from.
    """

    def __init__(self, module: nn.Module) -> None:
        from .errors import UnsupportedLayerError

        self.module = module
        widths = [
            (int(m.normalized_shape[-1]),) * 2 if isinstance(m, nn.LayerNorm) else _widths(BaseView(m))
            for m in module.modules()
            if layer_kind(m) is not None or isinstance(m, nn.LayerNorm)
        ]
        params = [*module.parameters(), *module.buffers()]
        if not widths or not params:
            raise UnsupportedLayerError(
                f"peftkit cannot wrap a {type(module).__name__}: it has no weight layer to read widths from"
            )
        self.kind = "module"
        self.transposed = False
        self.in_features = int(widths[0][0])
        self.out_features = int(widths[-1][1])
        self.weight_shape = (self.out_features, self.in_features)
        self._like = params[0]

    @property
    def weight(self) -> Tensor:
        raise TypeError(f"a {type(self.module).__name__} module has no weight of its own")

    @property
    def bias(self) -> Tensor | None:
        return None

    @property
    def dtype(self) -> torch.dtype:
        return self._like.dtype

    @property
    def device(self) -> torch.device:
        return self._like.device

    def apply(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        raise TypeError(f"a {type(self.module).__name__} module has no weight to run with another one")

    def describe(self) -> dict[str, object]:
        """Its type: the form the fingerprint check uses for any module that is not a weight layer."""
        return {"type": type(self.module).__name__}


class QuantizedView(QuantizedViewMixin, BaseView):  # type: ignore[misc]
    """The view of a quantised linear layer (bitsandbytes, torchao, hqq): the base output from the backend's own
    forward, ``weight`` dequantised on access, merging re-quantises. The behaviour is in
    :class:`peftkit.core.quant.QuantizedViewMixin`."""
