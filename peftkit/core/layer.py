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
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor, nn

from .base import BaseView
from .errors import AdapterIdsError, NotMergeableError
from .protocol import Adapter, LowRank, SparseDelta


@dataclass
class Routing:
    """Which adapters run. One instance is shared by every layer of an ``AdaptedModel``.

    Attributes:
        order: adapter names in the order they were added; position ``i`` is adapter id ``i``.
        active: names applied to every row when no ``adapter_ids`` are given.
        enabled: ``False`` runs the bare base model.
        adapter_ids: per-row adapter ids of the forward call in flight (set only for the duration of a call).
        shared_id: the id every row of ``adapter_ids`` has, if they all have the same one (``None`` otherwise):
            such a batch runs the single-adapter path, with no per-row grouping or gather.
        task_ids: per-row task ids of the forward call in flight (``model(..., task_ids=ids)``; set only for
            the duration of a call). Independent of ``adapter_ids``: they say which *task* a row belongs to, for
            methods whose adapter depends on it (task-routed inventories such as Poly/MHR). Only adapters that
            declare ``uses_task_ids = True`` receive them (as ``forward(..., task_ids=rows' ids)``).
        static_adapters: the owner promised that adapter tensors change only through adding, removing or
            renaming adapters (``AdaptedModel.set_static_adapters``), so mixed batches skip the per-forward
            version check of every adapter tensor.
        forward_state: values adapters hand to each other *within one forward of the model* (an adapter on the
            patch embedding publishes an image context that adapters at later blocks read). Only adapters that
            declare ``uses_forward_state = True`` receive it (as ``forward(..., state=forward_state)``); the
            ``AdaptedModel`` clears it when each forward ends, so nothing outlives the call.
    """

    order: list[str] = field(default_factory=list)
    active: tuple[str, ...] = ()
    enabled: bool = True
    adapter_ids: Tensor | None = None
    shared_id: int | None = None
    task_ids: Tensor | None = None
    static_adapters: bool = False
    forward_state: dict[str, Any] = field(default_factory=dict)


class _Slot(NamedTuple):
    """One adapter's row of a bank: the module and the tensors (with their versions) it was built from."""

    row: int
    adapter: Adapter
    sources: list[tuple[Tensor, int]]
    rank: int


@dataclass
class _Bank:
    """A layer's stacked low-rank adapters for mixed batches (see ``AdaptedLayer._lowrank_bank``).

    ``packed`` has one row per slot, ``[down (R×in) | (scale·up)ᵀ (R×out)]``, zero-padded to the bank's rank
    ``R``; row 0 stays all zeros and serves base-only rows; rows of removed adapters are reused by new ones.
    ``packed is None`` records that some adapter has no low-rank form.
    """

    order: tuple[str, ...]
    slots: dict[str, _Slot]
    packed: Tensor | None
    rank: int = 0
    slot_by_id: Tensor | None = None  # adapter id -> row; its last entry (id -1) is row 0
    tensors: list[Tensor] = field(default_factory=list)  # every slot's sources, flat: one freshness check
    versions: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        sources = [pair for slot in self.slots.values() for pair in slot.sources]
        self.tensors = [t for t, _ in sources]
        self.versions = [v for _, v in sources]

    def fresh(self) -> bool:
        """No adapter tensor was changed in place since the bank was built (their ``_version``)."""
        return [t._version for t in self.tensors] == self.versions


def _sources(adapter: Adapter) -> list[tuple[Tensor, int]]:
    # The tensors a bank row is built from, with their versions. Read from each module's own dicts: ~2x cheaper
    # than parameters()/buffers().
    out: list[tuple[Tensor, int]] = []
    for module in adapter.modules():
        out += [(t, t._version) for t in module._parameters.values() if t is not None]
        out += [(t, t._version) for t in module._buffers.values() if t is not None]
    return out


def _unchanged(slot: _Slot) -> bool:
    return all(t._version == v for t, v in slot.sources)


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
        self._bank: _Bank | None = None  # cached stacked low-rank bank for mixed batches (see _lowrank_bank)
        self._input_name: str | None = None  # the base forward's first parameter (for keyword-only calls)

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}, merged={list(self.merged)}"

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks fall through to the base module, so model code that reads a wrapped
        layer's attributes keeps working (HF ViT reads ``patch_embeddings.projection.weight.dtype``)."""
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
        if routing.adapter_ids is not None:
            return self._forward_mixed(x, base_out, routing.adapter_ids)
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
        ``uses_task_ids`` also get the task ids of those rows (``None`` when the call gave none), adapters that
        declare ``uses_forward_state`` the shared per-forward ``state`` dict."""
        if not (adapter.uses_task_ids or adapter.uses_forward_state):
            return adapter(x, base_out, self.base)
        extra: dict[str, Any] = {}
        if adapter.uses_task_ids:
            task_ids = self.routing.task_ids
            if task_ids is not None and rows is not None:
                task_ids = task_ids[rows.to(task_ids.device)]
            extra["task_ids"] = task_ids
        if adapter.uses_forward_state:
            extra["state"] = self.routing.forward_state
        return adapter(x, base_out, self.base, **extra)

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
        shared = self.routing.shared_id
        if shared is not None:  # one adapter (or the base) for every row: as if it were the active adapter
            name = self.routing.order[shared] if shared >= 0 else None
            if name is None or name not in self.adapters:
                return base_out
            return self._run_adapter(self.adapters[name], x, base_out)
        if not self.training and self.base.kind == "linear":
            bank = self._lowrank_bank()
            if bank is not None:
                return self._forward_bank(x, base_out, ids, bank)
        out = base_out
        for i in ids.unique().tolist():
            if i < 0 or self.routing.order[i] not in self.adapters:
                continue
            rows = (ids == i).nonzero().flatten()
            adapted = self._run_adapter(self.adapters[self.routing.order[i]], x[rows], base_out[rows], rows)
            out = out.index_copy(0, rows, adapted)
        return out

    def _lowrank_bank(self) -> _Bank | None:
        """Stack every low-rank adapter into one bank (see :class:`_Bank`); ``None`` when an adapter has no
        low-rank form.

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

    def _update_bank(self, bank: _Bank | None) -> _Bank:
        """``bank`` brought up to date with the adapters (a new bank when ``bank`` is ``None``, when the
        largest rank grows, or when most rows are free)."""
        order = tuple(self.routing.order)
        adapters = cast(dict[str, Adapter], cast(nn.ModuleDict, self.adapters)._modules)  # plain dict: per swap
        names = [n for n in order if n in adapters]
        slots: dict[str, _Slot] = {}
        if bank is not None:
            versions_unchanged = bank.fresh()  # the usual case: only adapters came or went
            slots = {
                n: slot
                for n, slot in bank.slots.items()
                if adapters.get(n) is slot.adapter and (versions_unchanged or _unchanged(slot))
            }
        forms: dict[str, LowRank] = {}
        for name in names:
            if name not in slots:
                form = adapters[name].lowrank(self.base)
                if form is None:
                    no_form = {n: _Slot(0, adapters[n], _sources(adapters[n]), 0) for n in names}
                    return _Bank(order, no_form, None)
                forms[name] = form
        rank = max([s.rank for s in slots.values()] + [f.down.shape[0] for f in forms.values()], default=1)
        d_in, d_out = self.base.in_features, self.base.out_features
        if bank is None or bank.packed is None or rank > bank.rank or len(bank.packed) > 4 * (len(names) + 4):
            # (re)pack every row: the first bank, a larger padded rank, or a bank mostly free after removals
            forms.update({n: cast(LowRank, adapters[n].lowrank(self.base)) for n in slots})
            slots, packed = {}, None
            rank = max([f.down.shape[0] for f in forms.values()], default=1)
        else:
            packed, rank = bank.packed, bank.rank
        used = {slot.row for slot in slots.values()}
        capacity = len(packed) if packed is not None else 0
        free = [row for row in range(1, capacity) if row not in used]
        if len(free) < len(forms):  # grow (doubling, so a server adding adapters one by one copies O(N) in total)
            grown = torch.zeros(
                max(2 * capacity, len(names) + 1),
                d_in * rank + rank * d_out,
                dtype=base_dtype(self.base),
                device=self.base.device,
            )
            if packed is not None:
                grown[:capacity] = packed
            free += range(max(capacity, 1), len(grown))
            packed = grown
        assert packed is not None
        down = packed[:, : d_in * rank].view(-1, rank, d_in)
        up_t = packed[:, d_in * rank :].view(-1, rank, d_out)
        for (name, f), row in zip(forms.items(), free):
            r = f.down.shape[0]
            down[row, :r], up_t[row, :r] = f.down, (f.up * f.scale).T
            if r < rank:  # a reused row may hold a larger adapter's values past r
                down[row, r:], up_t[row, r:] = 0, 0
            slots[name] = _Slot(row, adapters[name], _sources(adapters[name]), r)
        slot_by_id = torch.tensor([slots[n].row if n in slots else 0 for n in order] + [0], device=packed.device)
        return _Bank(order, {n: slots[n] for n in names}, packed, rank, slot_by_id)

    def _forward_bank(self, x: Tensor, base_out: Tensor, ids: Tensor, bank: _Bank) -> Tensor:
        """``base_out + (x downᵀ) (scale·up)ᵀ`` row by row: one gather and two batched matmuls per layer."""
        assert bank.packed is not None and bank.slot_by_id is not None
        slots = bank.slot_by_id[ids.to(bank.slot_by_id.device)]  # id -1 picks row 0, the zero row
        rows, rank = x.shape[0], bank.rank
        d_in, d_out = self.base.in_features, self.base.out_features
        sel = bank.packed.index_select(0, slots)
        hidden = torch.bmm(x.reshape(rows, -1, d_in), sel[:, : d_in * rank].view(rows, rank, d_in).transpose(1, 2))
        up_t = sel[:, d_in * rank :].view(rows, rank, d_out)
        out = base_out.reshape(rows, -1, d_out)
        if torch.is_grad_enabled():
            return torch.baddbmm(out, hidden, up_t).view(base_out.shape)
        return out.baddbmm_(hidden, up_t).view(base_out.shape)  # base_out is this layer's own fresh tensor

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


def base_dtype(base: BaseView) -> torch.dtype:
    return base.dtype if base.dtype.is_floating_point else torch.float32
