"""``AdaptedLayer``: a frozen base module plus its bank of named adapters.

The layer computes the base output once, then applies the adapters the owning model selected: one
active adapter, several (their changes are summed), or one per batch row (``adapter_ids``; ``-1`` runs the
row through the base alone). Layers never nest: adding a second adapter to a wrapped module adds it to the
same bank.
"""

from __future__ import annotations

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
        task_ids: per-row task ids of the forward call in flight (``model(..., task_ids=ids)``; set only for
            the duration of a call). Independent of ``adapter_ids``: they say which *task* a row belongs to, for
            methods whose adapter depends on it (task-routed inventories such as Poly/MHR). Only adapters that
            declare ``uses_task_ids = True`` receive them (as ``forward(..., task_ids=rows' ids)``).
        forward_state: values adapters hand to each other *within one forward of the model* (an adapter on the
            patch embedding publishes an image context that adapters at later blocks read). Only adapters that
            declare ``uses_forward_state = True`` receive it (as ``forward(..., state=forward_state)``); the
            ``AdaptedModel`` clears it when each forward ends, so nothing outlives the call.
    """

    order: list[str] = field(default_factory=list)
    active: tuple[str, ...] = ()
    enabled: bool = True
    adapter_ids: Tensor | None = None
    task_ids: Tensor | None = None
    forward_state: dict[str, Any] = field(default_factory=dict)


class _Slot(NamedTuple):
    """One adapter's row of a bank: the tensors it was built from (with their versions) and its rank."""

    row: int
    sources: list[tuple[Tensor, int]]
    rank: int


class _Bank(NamedTuple):
    """A layer's stacked low-rank adapters, valid while ``order`` and the ``sources`` versions are unchanged."""

    order: tuple[str, ...]
    slots: dict[str, _Slot]
    packed: Tensor | None  # [N+1, in·R + R·out]; None: some adapter has no low-rank form
    rank: int
    slot_by_id: Tensor | None

    def fresh(self) -> bool:
        return all(t._version == v for slot in self.slots.values() for t, v in slot.sources)


def _sources(adapter: Adapter) -> list[tuple[Tensor, int]]:
    # The tensors a bank row is built from, with their versions. Read from each module's own dicts: ~2x cheaper
    # than parameters()/buffers(), and a server swapping adapters calls this for every adapter of every layer.
    out: list[tuple[Tensor, int]] = []
    for module in adapter.modules():
        out += [(t, t._version) for t in module._parameters.values() if t is not None]
        out += [(t, t._version) for t in module._buffers.values() if t is not None]
    return out


def _unchanged(old: list[tuple[Tensor, int]], new: list[tuple[Tensor, int]]) -> bool:
    return len(old) == len(new) and all(a is b and va == vb for (a, va), (b, vb) in zip(old, new))


class AdaptedLayer(nn.Module):
    """Wraps one base module; holds ``adapters[name]`` for every adapter that targets it."""

    def __init__(self, base_layer: nn.Module, routing: Routing) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters: dict[str, Adapter] = nn.ModuleDict()  # type: ignore[assignment]  # typed by content
        self.base = BaseView(base_layer)
        self.routing = routing
        # name -> (ΔW, Δb) folded into the base weight; kept so unmerge subtracts exactly what was added.
        # what merge() added, per adapter, so unmerge() subtracts exactly that
        self.merged: dict[str, tuple[Tensor | SparseDelta, Tensor | None]] = {}
        self._bank: _Bank | None = None  # cached stacked low-rank bank for mixed batches (see _lowrank_bank)

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
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        base_out = self.base_layer(x, *args, **kwargs)
        routing = self.routing
        if not routing.enabled:
            return base_out
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
        """Stack every low-rank adapter into one bank of ``N+1`` slots holding ``down [R, in]`` and
        ``(scale·up)ᵀ [R, out]`` (zero-padded to the largest rank; the last slot is all zeros and serves
        base-only rows); ``None`` when an adapter has no low-rank form.

        Under ``no_grad`` the bank (or the answer ``None``) is cached. It is rebuilt when the adapters or their
        order change or when any parameter or buffer of an adapter is changed in place (its ``_version``);
        so the per-forward cost is a few attribute reads per adapter, not a rebuild.
        """
        order = tuple(self.routing.order)
        cacheable = not torch.is_grad_enabled()
        cached = self._bank
        if cacheable and cached is not None and cached.order == order and cached.fresh():
            return cached if cached.packed is not None else None
        # Rows of adapters unchanged since the last bank are copied over in one index_select; only new or
        # changed adapters are asked for their low-rank form (a server swapping one adapter in rebuilds one row).
        prev = cached if cached is not None and cached.packed is not None else None
        names = [n for n in order if n in self.adapters]
        sources = {n: _sources(self.adapters[n]) for n in names}
        forms: dict[str, LowRank] = {}
        reused: dict[str, _Slot] = {}
        for name in names:
            old = prev.slots.get(name) if prev is not None else None
            if old is not None and _unchanged(old.sources, sources[name]):
                reused[name] = old
                continue
            form = self.adapters[name].lowrank(self.base)
            if form is None:
                if cacheable:
                    self._bank = _Bank(order, {m: _Slot(-1, sources[m], 0) for m in names}, None, 0, None)
                return None
            forms[name] = form
        ranks = {m: reused[m].rank if m in reused else forms[m].down.shape[0] for m in names}
        rank = max(ranks.values())
        if prev is None or prev.rank != rank:  # the padding changes: every row is rebuilt
            forms.update({m: cast(LowRank, self.adapters[m].lowrank(self.base)) for m in reused})
            reused = {}
        n, dtype, device = len(names), base_dtype(self.base), self.base.device
        d_in, d_out = self.base.in_features, self.base.out_features
        # One row per slot: [down (R×in) | (scale·up)ᵀ (R×out)], so a mixed batch gathers both in one op.
        # (down is kept as stored, [R, in]: the batched x·downᵀ then reads both operands along `in`, which is
        # ~20% faster than a [in, R] layout for few tokens per row.)
        packed = torch.zeros(n + 1, d_in * rank + rank * d_out, dtype=dtype, device=device)
        slots = {name: _Slot(i, sources[name], ranks[name]) for i, name in enumerate(names)}
        if reused and prev is not None and prev.packed is not None:
            to = torch.tensor([slots[name].row for name in reused], device=device)
            at = torch.tensor([s.row for s in reused.values()], device=prev.packed.device)
            packed.index_copy_(0, to, prev.packed.index_select(0, at))
        down = packed[:, : d_in * rank].view(n + 1, rank, d_in)
        up_t = packed[:, d_in * rank :].view(n + 1, rank, d_out)
        for name, f in forms.items():
            i = slots[name].row
            down[i, : f.down.shape[0]] = f.down
            up_t[i, : f.up.shape[1]] = (f.up * f.scale).T
        slot_by_id = torch.tensor([slots[name].row if name in slots else n for name in order] + [n], device=device)
        bank = _Bank(order, slots, packed, rank, slot_by_id)
        self._bank = bank if cacheable else None
        return bank

    def _forward_bank(self, x: Tensor, base_out: Tensor, ids: Tensor, bank: _Bank) -> Tensor:
        """``base_out + (x downᵀ) (scale·up)ᵀ`` row by row: one gather and two batched matmuls per layer."""
        assert bank.packed is not None and bank.slot_by_id is not None
        slots = bank.slot_by_id[ids.to(bank.slot_by_id.device)]  # id -1 picks the trailing base slot
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
        self.adapters[name] = adapter
        self._invalidate_bank()

    def remove(self, name: str) -> None:
        if name in self.merged:
            self.unmerge(name)
        del self.adapters[name]
        self._invalidate_bank()

    def _invalidate_bank(self) -> None:
        # Not dropped: the next rebuild copies the rows of the adapters that did not change. An order that
        # matches nothing forces that rebuild (a name removed and added again may restore the same order).
        if self._bank is not None:
            self._bank = self._bank._replace(order=())

    # ------------------------------------------------------------------------------------------------ merging
    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold adapter ``name`` into the base weight (``W += ΔW`` in float32)."""
        if name in self.merged:
            return
        adapter = self.adapters[name]
        sparse = adapter.sparse_delta(self.base)
        if sparse is not None and adapter.delta_bias(self.base) is None:  # O(entries), no dense [out, in] delta
            sparse = SparseDelta(sparse.positions, sparse.values.detach().clone())
            self.base.add_to_entries(sparse.positions, sparse.values)
            self.merged[name] = (sparse, None)
            return
        delta = adapter.delta_weight(self.base)
        if delta is None:
            raise NotMergeableError(
                f"method {adapter.method!r} (adapter {name!r}) has no weight-space equivalent and cannot be merged"
            )
        delta = delta.detach().clone()
        delta_bias = adapter.delta_bias(self.base)
        if delta_bias is not None:
            delta_bias = delta_bias.detach().clone()
            if self.base.bias is None:
                raise NotMergeableError(f"adapter {name!r} changes the bias but the base module has none")
        self.base.add_to_weight(delta, delta_bias)
        self.merged[name] = (delta, delta_bias)

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        """Subtract exactly what :meth:`merge` added."""
        delta, delta_bias = self.merged.pop(name)
        if isinstance(delta, SparseDelta):
            self.base.add_to_entries(delta.positions, delta.values, sign=-1.0)
        else:
            self.base.add_to_weight(delta, delta_bias, sign=-1.0)


def base_dtype(base: BaseView) -> torch.dtype:
    return base.dtype if base.dtype.is_floating_point else torch.float32
