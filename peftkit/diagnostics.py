"""Diagnostics of adapted models: the norm quantities of "Computational Limits of LoRA".

Hu, Su, Kuo, Song and Liu, "Computational Limits of Low-Rank Adaptation (LoRA) for Transformer-Based Models"
(ICLR 2025), study how fast the gradient of LoRA on attention weights (partial: ``W_Q``, ``W_V``; full: ``W_Q``,
``W_K``, ``W_V``) can be computed for a sequence of ``L`` tokens. Assuming SETH, they show a phase transition
stated in max-norms (``‖M‖_max``: the largest absolute entry of ``M``) of the products of the input sequence
``X`` with the pretrained weight ``W⋆`` and with the adapter ``αBA/r``: when these products are bounded by
``Γ = o(√log L)`` the gradient admits an almost-linear-time (``L^(1+o(1))``) approximation, and above a
threshold of order ``Ω(√log L)`` no sub-quadratic (``L^(2-Ω(1))``) algorithm exists.

:func:`lora_norm_bound` runs one batch through an adapted model and, for every adapted layer and adapter,
reports those quantities as measured on that batch: ``‖X‖_max``, ``‖W⋆‖_max``, ``‖αBA/r‖_max``,
``‖X W⋆‖_max``, ``‖X αBA/r‖_max``, ``‖X (W⋆ + αBA/r)‖_max``, their bound ``Γ`` and ``Γ / √log L``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.core.errors import PeftkitError
from peftkit.core.layer import AdaptedLayer
from peftkit.core.model import AdaptedModel

__all__ = ["DiagnosticsError", "LayerNormBound", "NormBoundReport", "lora_norm_bound"]


class DiagnosticsError(PeftkitError, ValueError):
    """A model or batch a diagnostic cannot measure (merged or disabled adapters, an unknown adapter, a batch
    of the wrong type, a layer the batch never reached)."""


@dataclass(frozen=True)
class LayerNormBound:
    """The paper's norm quantities for one adapter on one adapted layer, measured on one batch.

    ``X`` is the layer's input with its token axis as rows (``[tokens, in]``), ``W⋆`` the frozen pretrained
    weight and ``ΔW`` the adapter's update, ``αBA/r`` for LoRA (the paper's adapter term). Products are taken
    without the bias. Fields that need ``ΔW`` are ``None`` for an adapter that has no weight-space form.

    Attributes:
        layer: module path of the adapted layer.
        adapter: adapter name.
        kind: the layer kind (``"linear"``, ``"conv2d"``, ``"embedding"``, ``"module"``).
        delta_source: how ``ΔW`` was obtained: ``"lowrank"`` (the adapter's ``lowrank()``, ``ΔW = scale·up·down``,
            exactly ``αBA/r`` for LoRA), ``"delta_weight"`` (its ``delta_weight()``, e.g. DoRA, whose update is
            not ``αBA/r``) or ``"none"``.
        seq_len: ``L``, tokens per sequence (the size of the axis attention runs over).
        sqrt_log_L: ``√log L`` (natural log), the scale of the paper's threshold; ``None`` when ``L < 2``.
        x_max: ``‖X‖_max`` (1 for an embedding, whose input is a one-hot vector).
        w_max: ``‖W⋆‖_max``.
        delta_max: ``‖ΔW‖_max`` (``‖αBA/r‖_max``).
        xw_max: ``‖X W⋆‖_max``.
        xdelta_max: ``‖X ΔW‖_max`` (``‖X αBA/r‖_max``).
        adapted_max: ``‖X (W⋆ + ΔW)‖_max``, the product with the adapted weight.
        gamma: ``Γ = max(‖X W⋆‖_max, ‖X ΔW‖_max)``, the shared bound the paper states its threshold for.
        gamma_over_sqrt_log_L: ``Γ / √log L``; ``None`` when ``L < 2``.
    """

    layer: str
    adapter: str
    kind: str
    delta_source: str
    seq_len: int | None
    sqrt_log_L: float | None
    x_max: float
    w_max: float | None
    delta_max: float | None
    xw_max: float | None
    xdelta_max: float | None
    adapted_max: float | None
    gamma: float | None
    gamma_over_sqrt_log_L: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class NormBoundReport:
    """Per-layer, per-adapter rows of :func:`lora_norm_bound` (in model order, adapters in id order)."""

    rows: tuple[LayerNormBound, ...]

    def __iter__(self) -> Any:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[str, str]) -> LayerNormBound:
        """``report[i]``, or ``report[layer_path, adapter_name]``."""
        if isinstance(key, tuple):
            for row in self.rows:
                if (row.layer, row.adapter) == key:
                    return row
            raise KeyError(f"no row for layer {key[0]!r} and adapter {key[1]!r}")
        return self.rows[key]

    @property
    def max_gamma_over_sqrt_log_L(self) -> float | None:
        """The largest ``Γ / √log L`` over all rows (``None`` if no row has one)."""
        values = [r.gamma_over_sqrt_log_L for r in self.rows if r.gamma_over_sqrt_log_L is not None]
        return max(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [r.to_dict() for r in self.rows], "max_gamma_over_sqrt_log_L": self.max_gamma_over_sqrt_log_L}

    def table(self) -> str:
        """A plain-text table, one line per row."""
        cols = ("x_max", "w_max", "delta_max", "xw_max", "xdelta_max", "gamma", "gamma_over_sqrt_log_L")
        heads = ("|X|max", "|W*|max", "|dW|max", "|XW*|max", "|XdW|max", "Gamma", "Gamma/sqrt(logL)")
        width = max([len("layer")] + [len(r.layer) for r in self.rows])
        aw = max([len("adapter")] + [len(r.adapter) for r in self.rows])
        lines = [f"{'layer':<{width}}  {'adapter':<{aw}}  {'L':>6}  " + "  ".join(f"{h:>10}" for h in heads)]
        for r in self.rows:
            vals = "  ".join(f"{_fmt(getattr(r, c)):>{max(10, len(h))}}" for c, h in zip(cols, heads, strict=True))
            lines.append(f"{r.layer:<{width}}  {r.adapter:<{aw}}  {_fmt(r.seq_len):>6}  {vals}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _fmt(value: float | int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def lora_norm_bound(
    model: AdaptedModel,
    batch: Tensor | Mapping[str, Any] | Sequence[Any],
    *,
    adapters: str | Sequence[str] | None = None,
    seq_len: int | None = None,
) -> NormBoundReport:
    """Measure, on one batch, the norm quantities the phase-transition result of Hu et al. (ICLR 2025) is
    stated in, for every adapted layer and adapter of ``model``.

    One forward pass of ``batch`` (``model(batch)`` for a tensor, ``model(**batch)`` for a mapping,
    ``model(*batch)`` for a tuple or list) runs in eval mode without gradients, with forward hooks on the adapted
    layers' base modules capturing each layer's input ``X``; the hooks are removed and every module's train/eval
    flag restored afterwards, and no tensor of the model is written. For each adapter ``a`` in ``adapters``
    (default: the active adapters) on each layer it targets, ``ΔW`` comes from the protocol: ``lowrank()`` when
    the adapter has one (``X ΔW`` is then computed as ``scale·(X downᵀ) upᵀ``, the low-rank chain the paper's
    fast algorithms use), else ``delta_weight()``; see :class:`LayerNormBound` for each number. For a LoRA with a
    residual initialisation (PiSSA, LoRA-GA, LoKU) ``W⋆`` is the untouched base weight and ``ΔW = s(BA − B₀A₀)``
    its change, so ``X (W⋆ + ΔW)`` is the product with the weight the forward uses.

    ``L`` is the size of the token axis: ``X.shape[-2]`` for a linear layer with a ``[batch, tokens, in]``
    input, ``H·W`` for a convolution, ``ids.shape[-1]`` for an embedding; a linear layer fed ``[rows, in]`` has no
    token axis (``L`` is ``None``) unless ``seq_len`` says how long the sequences are.

    What the numbers mean: the paper proves that the LoRA gradient for attention can be approximated in almost
    linear time in ``L`` when ``Γ = max(‖X W⋆‖_max, ‖X αBA/r‖_max) = o(√log L)``, and not in sub-quadratic time
    (under SETH) when ``Γ = Ω(√log L)``. A small ``Γ / √log L`` therefore says that this batch lies on the side of
    the threshold where such algorithms can exist; its practical advice is to keep inputs normalised (pre-LN),
    ``α/r`` and adapter norms small (``B = 0`` init, weight decay) and to prefer partial adaptation.

    What they do NOT promise: the result is asymptotic (``L → ∞`` with ``d = O(log L)``) and its constants are
    unknown, so no value of ``Γ / √log L`` is a cut-off for a finite model; it concerns algorithms for the
    attention gradient (``W_Q``, ``W_K``, ``W_V``; other layers are reported for completeness only), which peftkit
    does not implement (training here uses ordinary dense attention, whose cost these numbers do not change);
    the numbers are measured on one batch, not bounded over the data; and they say nothing about training speed,
    convergence or accuracy.

    Raises:
        DiagnosticsError: ``model`` is not an :class:`~peftkit.AdaptedModel`; ``batch`` is not a tensor, mapping,
            tuple or list; adapters are disabled or one to measure is merged; a name is not an adapter of the
            model; ``seq_len`` is not a positive int; an adapted layer was not reached by the batch.
        NoAdaptersError: the model holds no adapters (or none is active and ``adapters`` is not given).
    """
    if not isinstance(model, AdaptedModel):
        raise DiagnosticsError(
            f"lora_norm_bound needs a peftkit AdaptedModel (pk.adapt(...)), got a {type(model).__name__}"
        )
    if not isinstance(batch, (Tensor, Mapping, tuple, list)):
        raise DiagnosticsError(
            f"batch must be a tensor, a mapping of keyword arguments or a tuple/list of positional arguments "
            f"for the model's forward, got a {type(batch).__name__}"
        )
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise DiagnosticsError(f"seq_len must be a positive int, got {seq_len!r}")
    names = _adapters_to_measure(model, adapters)
    wanted = {p for n in names for p in model.layer_paths[n]}
    layers = [(p, model.adapted_layer(p)) for p, _ in model.model.named_modules() if p in wanted]  # model order
    for path, layer in layers:
        merged = [n for n in names if n in layer.merged]
        if merged:
            raise DiagnosticsError(
                f"adapter(s) {merged} are merged into {path!r}: unmerge() first, so that W⋆ is the pretrained weight"
            )

    rows: dict[str, list[LayerNormBound]] = {}
    hooks = []
    modes = {m: m.training for m in model.modules()}
    try:
        for path, layer in layers:
            hook = _hook(path, layer, names, seq_len, rows)
            hooks.append(layer.base_layer.register_forward_hook(hook, with_kwargs=True))
        if any(modes.values()):  # (eval() also drops the layers' cached mixed-batch banks: only when needed)
            model.eval()
        with torch.no_grad():
            if isinstance(batch, Tensor):
                model(batch)
            elif isinstance(batch, Mapping):
                model(**batch)
            else:
                model(*batch)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    missing = [path for path, _ in layers if path not in rows]
    if missing:
        raise DiagnosticsError(f"the batch never reached the adapted layer(s) {missing}: nothing to measure there")
    return NormBoundReport(tuple(row for path, _ in layers for row in rows[path]))


def _adapters_to_measure(model: AdaptedModel, adapters: str | Sequence[str] | None) -> list[str]:
    if not model.adapter_names:
        raise model.no_adapters_error()
    if not model.routing.enabled:
        raise DiagnosticsError("adapters are disabled (disable_adapters()): enable_adapters() before measuring")
    if adapters is None:
        if not model.active_adapters:
            raise model.no_adapters_error()
        return model.active_adapters
    names = [adapters] if isinstance(adapters, str) else list(adapters)
    for n in names:
        if n not in model.adapter_names:
            raise DiagnosticsError(f"no adapter named {n!r}; the model holds {model.adapter_names}")
    return [n for n in model.adapter_names if n in names]  # id order


def _hook(path: str, layer: AdaptedLayer, names: list[str], seq_len: int | None, rows: dict[str, list]) -> Any:
    first = next(iter(inspect.signature(layer.base_layer.forward).parameters), None)

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if path in rows:  # a layer run twice in one forward (weight sharing): the first call is measured
            return
        x = args[0] if args else kwargs.get(first) if first is not None else None
        if not isinstance(x, Tensor):
            return
        rows[path] = [_measure(path, name, layer, x, seq_len) for name in names if name in layer.adapters]

    return hook


def _measure(path: str, name: str, layer: AdaptedLayer, x: Tensor, seq_len: int | None) -> LayerNormBound:
    base, adapter = layer.base, layer.adapters[name]
    kind = base.kind
    L = seq_len if seq_len is not None else _tokens(kind, x)
    sqrt_log_l = math.sqrt(math.log(L)) if L is not None and L >= 2 else None
    x_max = 1.0 if kind == "embedding" else _max(x)
    if kind == "module":  # a whole block: no weight, no product to report
        return LayerNormBound(path, name, kind, "none", L, sqrt_log_l, x_max, *(None,) * 7)
    w = base.weight
    xw = base.apply(x, w)
    low = adapter.lowrank(base) if kind == "linear" else None
    if low is not None:
        source = "lowrank"
        delta = low.scale * (low.up.float() @ low.down.float())
        xdelta = low.scale * ((x.to(low.down.dtype) @ low.down.T) @ low.up.T)
    else:
        d = adapter.delta_weight(base)
        source = "none" if d is None else "delta_weight"
        delta = None if d is None else d.to(w.dtype)
        xdelta = None if delta is None else base.apply(x, delta)
    xw_max = _max(xw)
    xdelta_max = None if xdelta is None else _max(xdelta)
    adapted_max = xw_max if xdelta is None else _max(xw.float() + xdelta.float())
    gamma = xw_max if xdelta_max is None else max(xw_max, xdelta_max)
    return LayerNormBound(
        layer=path,
        adapter=name,
        kind=kind,
        delta_source=source,
        seq_len=L,
        sqrt_log_L=sqrt_log_l,
        x_max=x_max,
        w_max=_max(w),
        delta_max=None if delta is None else _max(delta),
        xw_max=xw_max,
        xdelta_max=xdelta_max,
        adapted_max=adapted_max,
        gamma=gamma,
        gamma_over_sqrt_log_L=None if sqrt_log_l is None else gamma / sqrt_log_l,
    )


def _tokens(kind: str, x: Tensor) -> int | None:
    """``L``: the token axis of a layer input (see :func:`lora_norm_bound`)."""
    if kind == "conv2d":
        return int(x.shape[-1] * x.shape[-2]) if x.dim() >= 3 else None
    if kind == "embedding":
        return int(x.shape[-1]) if x.dim() >= 2 else None
    return int(x.shape[-2]) if x.dim() >= 3 else None


def _max(t: Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0
