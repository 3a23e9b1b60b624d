"""``AdaptedLayer``: a frozen base module plus its bank of named adapters.

The layer computes the base output once, then applies the adapters the owning model selected: one
active adapter, several (their changes are summed), or one per batch row (``adapter_ids``; ``-1`` runs the
row through the base alone). Layers never nest: adding a second adapter to a wrapped module adds it to the
same bank.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from .bank import Bank, forward_bank, update_bank
from .base import BaseView
from .context import ForwardContext
from .errors import AdapterIdsError, NotMergeableError
from .protocol import Adapter, SparseDelta


@dataclass
class Routing:
    """Which adapters run. One instance is shared by every layer of an ``AdaptedModel``.

    Attributes:
        order: adapter names in the order they were added; position ``i`` is adapter id ``i``.
        active: names applied to every row when no ``adapter_ids`` are given.
        enabled: ``False`` runs the bare base model.
        static_adapters: the owner promised that adapter tensors change only through adding, removing or
            renaming adapters (``AdaptedModel.set_static_adapters``), so mixed batches skip the per-forward
            version check of every adapter tensor.
        call: the per-call inputs of the forward in flight (:class:`ForwardContext`: per-row adapter and task
            ids, per-forward state); an empty context between calls.
    """

    order: list[str] = field(default_factory=list)
    active: tuple[str, ...] = ()
    enabled: bool = True
    static_adapters: bool = False
    call: ForwardContext = field(default_factory=ForwardContext)


class AdaptedLayer(nn.Module):
    """Wraps one base module; holds ``adapters[name]`` for every adapter that targets it."""

    def __init__(self, base_layer: nn.Module, routing: Routing) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters: dict[str, Adapter] = nn.ModuleDict()  # type: ignore[assignment]  # typed by content
        self.base = BaseView(base_layer)
        self.routing = routing
        # name -> (ΔW, Δb) folded into the base weight; kept so unmerge subtracts exactly what was added.
        self.merged: dict[str, tuple[Tensor | SparseDelta, Tensor | None]] = {}
        self._bank: Bank | None = None  # cached stacked low-rank bank for mixed batches (see _lowrank_bank)
        self._input_name: str | None = None  # the base forward's first parameter (for keyword-only calls)

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, merged={list(self.merged)}"

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks fall through to the base module, so model code that reads a wrapped
        layer's attributes keeps working (HF ViT reads ``patch_embeddings.projection.weight.dtype``)."""
        modules = self.__dict__.get("_modules")
        if modules is not None and name in modules:  # base_layer / adapters, read on every forward: the short way
            return modules[name]
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        base_out = self.base_layer(*args, **kwargs)
        routing = self.routing
        if not routing.enabled:
            return base_out
        if isinstance(base_out, Tensor):
            return self._adapt(args[0] if args else self._first_input(kwargs), base_out)
        # A block ("module" kind) may return a tuple (HF attention: (output, weights)): its first element is the
        # output the adapters change; the rest is passed through.
        if isinstance(base_out, (tuple, list)) and base_out and isinstance(base_out[0], Tensor):
            adapted = self._adapt(args[0] if args else self._first_input(kwargs), base_out[0])
            return type(base_out)((adapted, *base_out[1:]))
        raise TypeError(
            f"peftkit adapts a module's tensor output (or the first element of a tuple); "
            f"{type(self.base_layer).__name__} returned a {type(base_out).__name__}"
        )

    def _first_input(self, kwargs: dict[str, Any]) -> Tensor:
        """``x`` of a call made with keyword arguments only: the base forward's first parameter (HF CLIP calls
        ``layer(hidden_states=...)``)."""
        name = self._input_name
        if name is None:
            name = self._input_name = next(iter(inspect.signature(self.base_layer.forward).parameters))
        if name not in kwargs:
            raise TypeError(f"{type(self.base_layer).__name__} was called without its first argument {name!r}")
        return kwargs[name]

    def _adapt(self, x: Tensor, base_out: Tensor) -> Tensor:
        routing = self.routing
        if routing.call.adapter_ids is not None:
            return self._forward_mixed(x, base_out, routing.call.adapter_ids)
        active = [n for n in routing.active if n in self.adapters and n not in self.merged]
        if not active:
            return base_out
        if len(active) == 1:
            return self._run_adapter(self.adapters[active[0]], x, base_out)
        out = base_out
        for name in active:  # several active adapters: their changes to the base output add up
            out = out + (self._run_adapter(self.adapters[name], x, base_out) - base_out)
        return out

    def _run_adapter(self, adapter: Adapter, x: Tensor, base_out: Tensor, rows: Tensor | None = None) -> Tensor:
        """Run one adapter on ``x`` (the batch rows ``rows`` of the call, or all of them); adapters that declare
        ``uses_context`` also get the call's :class:`ForwardContext` as those rows see it."""
        if not adapter.uses_context:
            return adapter(x, base_out, self.base)
        return adapter(x, base_out, self.base, context=self.routing.call.for_rows(rows))

    def _forward_mixed(self, x: Tensor, base_out: Tensor, ids: Tensor) -> Tensor:
        if self.merged:
            raise AdapterIdsError(
                f"adapters {list(self.merged)} are merged into the weights; unmerge them "
                "before running a mixed batch with adapter_ids"
            )
        if x.shape[0] != ids.shape[0]:
            raise AdapterIdsError(f"adapter_ids has {ids.shape[0]} entries but the batch has {x.shape[0]} rows")
        if not self.adapters:
            return base_out
        shared = self.routing.call.shared_id
        if shared is not None:  # one adapter (or the base) for every row: as if it were the active adapter
            name = self.routing.order[shared] if shared >= 0 else None
            if name is None or name not in self.adapters:
                return base_out
            return self._run_adapter(self.adapters[name], x, base_out)
        if not self.training and self.base.kind == "linear":
            bank = self._lowrank_bank()
            if bank is not None:
                return forward_bank(x, base_out, ids, bank, self.base)
        out = base_out
        for i in ids.unique().tolist():
            if i < 0 or self.routing.order[i] not in self.adapters:
                continue
            rows = (ids == i).nonzero().flatten()
            adapted = self._run_adapter(self.adapters[self.routing.order[i]], x[rows], base_out[rows], rows)
            out = out.index_copy(0, rows, adapted)
        return out

    def _update_bank(self, bank: Bank | None) -> Bank:
        adapters = cast(dict[str, Adapter], cast(nn.ModuleDict, self.adapters)._modules)  # plain dict: per swap
        return update_bank(bank, adapters, tuple(self.routing.order), self.base)

    def _lowrank_bank(self) -> Bank | None:
        """Stack every low-rank adapter into one bank (see :class:`~peftkit.core.bank.Bank`); ``None`` when an
        adapter has no low-rank form.

        Under ``no_grad`` the bank (or the answer ``None``) is kept and updated in place: when adapters are
        added, removed or changed in place (a tensor's ``_version``), only their rows are written; the other
        rows are not touched, so a server swapping one adapter in writes one row per layer. With gradients
        enabled the bank is built anew from the adapters' live tensors, so gradients reach them.
        """
        order = tuple(self.routing.order)
        bank = self._bank
        if not torch.is_grad_enabled():
            if bank is not None and bank.order == order and (self.routing.static_adapters or bank.fresh()):
                return bank if bank.packed is not None else None
            self._bank = bank = self._update_bank(bank if bank is not None and bank.packed is not None else None)
            return bank if bank.packed is not None else None
        self._bank = None
        built = self._update_bank(None)
        return built if built.packed is not None else None

    # ----------------------------------------------------------------------------------------------- adapters
    def add(self, name: str, adapter: Adapter) -> None:
        """Add ``adapter`` as ``name`` (replacing the module of that name, if any)."""
        self.adapters[name] = adapter
        self._invalidate_bank()

    def remove(self, name: str) -> None:
        if name in self.merged:
            self.unmerge(name)
        del self.adapters[name]
        self._invalidate_bank()

    def _invalidate_bank(self) -> None:
        # Not dropped: the next forward updates the rows of the adapters that changed. An order that matches
        # nothing forces that update (a name removed and added again may restore the same order).
        if self._bank is not None:
            self._bank.order = ()

    def _apply(self, fn: Any, recurse: bool = True) -> AdaptedLayer:
        # .to(dtype/device) converts tensors without bumping their versions: the bank is rebuilt from them.
        self._bank = None
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> AdaptedLayer:
        # Training may replace adapter tensors by new objects (growing ranks), which the in-place version
        # check of the mixed-batch bank cannot see: a mode switch rebuilds it.
        self._bank = None
        return super().train(mode)

    # ------------------------------------------------------------------------------------------------ merging
    @torch.no_grad()
    def merge(self, names: str | Sequence[str]) -> None:
        """Fold adapters ``names`` into the base weight (``W += ΔW`` in float32), all or none.

        Every ``ΔW`` is computed against the base's own weight ``W``, never against ``W`` plus adapters merged
        before it: a method whose ``ΔW`` depends on ``W`` (DoRA's column norm, PaCA, SST, ...) then merges to
        exactly what the forward with several active adapters computes (``y = W x + Σᵢ ΔWᵢ x``). Adapters merged
        by an earlier call are taken out (their stored deltas subtracted) while the new deltas are computed, and
        put back after. (While some adapters are merged and others run unmerged, the unmerged ones do see the
        merged weight, as in PEFT: merge them together, or unmerge first, to get exact sums.)
        """
        todo = [names] if isinstance(names, str) else list(names)
        todo = [n for n in dict.fromkeys(todo) if n not in self.merged]
        if not todo:
            return
        earlier = list(self.merged.items())
        for name in reversed(self.merged):
            self._add(self.merged[name], sign=-1.0)
        self.merged = {}
        try:
            new = {name: self._delta(name) for name in todo}
        except BaseException:
            for _, entry in earlier:
                self._add(entry)
            self.merged = dict(earlier)
            raise
        self.merged = dict(earlier)
        for _, entry in earlier:
            self._add(entry)
        for name, entry in new.items():
            self._add(entry)
            self.merged[name] = entry

    def _delta(self, name: str) -> tuple[Tensor | SparseDelta, Tensor | None]:
        """Adapter ``name``'s update as stored for merging (a copy, so unmerging subtracts exactly this)."""
        adapter = self.adapters[name]
        sparse = adapter.sparse_delta(self.base)
        if sparse is not None and adapter.delta_bias(self.base) is None:  # O(entries), no dense [out, in] delta
            return SparseDelta(sparse.positions, sparse.values.detach().clone()), None
        delta = adapter.delta_weight(self.base)
        if delta is None:
            raise NotMergeableError(
                f"method {adapter.method!r} (adapter {name!r}) has no weight-space equivalent and cannot be merged"
            )
        delta_bias = adapter.delta_bias(self.base)
        if delta_bias is not None and self.base.bias is None:
            raise NotMergeableError(f"adapter {name!r} changes the bias but the base module has none")
        return delta.detach().clone(), None if delta_bias is None else delta_bias.detach().clone()

    def _add(self, entry: tuple[Tensor | SparseDelta, Tensor | None], sign: float = 1.0) -> None:
        delta, delta_bias = entry
        if isinstance(delta, SparseDelta):
            self.base.add_to_entries(delta.positions, delta.values, sign=sign)
        else:
            self.base.add_to_weight(delta, delta_bias, sign=sign)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Subtract exactly what :meth:`merge` added."""
        self._add(self.merged.pop(name), sign=-1.0)
