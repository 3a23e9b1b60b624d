"""The mixed-batch bank of one layer: every low-rank adapter stacked, so that rows of a batch that name
different adapters run in one pass: the C++ kernel of :mod:`.bgmv` (each adapter's factors read once per call)
where it applies, else one gather and two batched matmuls (see ``AdaptedLayer._lowrank_bank`` for when the bank
is kept and when rebuilt, and :func:`forward_bank` for the choice)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, cast

import torch
from torch import Tensor

from . import bgmv
from .base import BaseView
from .protocol import Adapter, LowRank

# Run mixed batches through the C++ kernel where it applies (tests and benchmarks turn it off to check or time the
# PyTorch gather path on the same model).
KERNEL = True


class Slot(NamedTuple):
    """One adapter's row of a bank: the module and the tensors (with their versions) it was built from."""

    row: int
    adapter: Adapter
    sources: list[tuple[Tensor, int]]
    rank: int


@dataclass
class Bank:
    """A layer's stacked low-rank adapters for mixed batches (see ``AdaptedLayer._lowrank_bank``).

    ``packed`` has one row per slot, ``[down (R×in) | (scale·up)ᵀ (R×out)]``, zero-padded to the bank's rank
    ``R``; row 0 stays all zeros and serves base-only rows; rows of removed adapters are reused by new ones.
    ``packed is None`` records that some adapter has no low-rank form.
    """

    order: tuple[str, ...]
    slots: dict[str, Slot]
    packed: Tensor | None
    rank: int = 0
    slot_by_id: Tensor | None = None  # adapter id -> row; its last entry (id -1) is row 0
    ranks: Tensor | None = None  # row -> its adapter's rank (0: row 0 and free rows), int64 on the CPU
    down: Tensor | None = None  # views of packed: [rows, R, in] and [rows, R, out]
    up: Tensor | None = None
    tensors: list[Tensor] = field(default_factory=list)  # every slot's sources, flat: one freshness check
    versions: list[int] = field(default_factory=list)
    kernel: bool = False  # the C++ op can run on this bank (decided once: CPU, float32 / float64, op built)

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


def _unchanged(slot: Slot) -> bool:
    return all(t._version == v for t, v in slot.sources)


def update_bank(bank: Bank | None, adapters: dict[str, Adapter], order: tuple[str, ...], base: BaseView) -> Bank:
    """``bank`` brought up to date with ``adapters`` (a layer's adapters by name; ``order``: every adapter
    name of the model, position = id): a new bank when ``bank`` is ``None``, when the largest rank grows, or
    when most rows are free."""
    names = [n for n in order if n in adapters]
    slots: dict[str, Slot] = {}
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
            form = adapters[name].lowrank(base)
            if form is None:
                no_form = {n: Slot(0, adapters[n], _sources(adapters[n]), 0) for n in names}
                return Bank(order, no_form, None)
            forms[name] = form
    rank = max([s.rank for s in slots.values()] + [f.down.shape[0] for f in forms.values()], default=1)
    d_in, d_out = base.in_features, base.out_features
    if bank is None or bank.packed is None or rank > bank.rank or len(bank.packed) > 4 * (len(names) + 4):
        # (re)pack every row: the first bank, a larger padded rank, or a bank mostly free after removals
        forms.update({n: cast(LowRank, adapters[n].lowrank(base)) for n in slots})
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
            dtype=base_dtype(base),
            device=base.device,
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
        slots[name] = Slot(row, adapters[name], _sources(adapters[name]), r)
    slot_by_id = torch.tensor([slots[n].row if n in slots else 0 for n in order] + [0], device=packed.device)
    ranks = torch.zeros(len(packed), dtype=torch.long)
    if slots:
        ranks[torch.tensor([s.row for s in slots.values()])] = torch.tensor([s.rank for s in slots.values()])
    return Bank(
        order,
        {n: slots[n] for n in names},
        packed,
        rank,
        slot_by_id,
        ranks=ranks,
        down=down,
        up=up_t,
        kernel=bgmv.usable(packed),
    )


def forward_bank(x: Tensor, base_out: Tensor, ids: Tensor, bank: Bank, base: BaseView) -> Tensor:
    """``base_out + (x downᵀ) (scale·up)ᵀ`` row by row (row ``i`` with the adapter of id ``ids[i]``).

    The C++ kernel (:func:`.bgmv.bgmv_`) where it applies: CPU, float32 / float64, no gradient wanted, the
    kernel built. It reads each adapter's factors once per call and only up to each adapter's own rank, and was
    measured no slower than the gather at every shape tried (1 to 512 tokens per row, 2 to 128 adapters; 0.45-0.76x
    at 256 rows of one token, 0.93-1.02x from 16 tokens per row on: ``benchmarks/README.md``, issue 19), so the
    batch shape does not switch it off. Elsewhere (gradients, other dtypes or
    devices, no compiler) one gather of the rows' padded factors and two batched matmuls, which autograd
    differentiates.
    """
    packed = bank.packed
    assert packed is not None and bank.slot_by_id is not None
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or base_out.requires_grad or packed.requires_grad)
    # One call per adapted module per decode step: the checks are kept to a few attribute reads (what the bank
    # allows is decided when it is built; the op flattens the leading dimensions itself).
    if KERNEL and bank.kernel and not wants_grad and ids.is_cpu and x.dtype == base_out.dtype == packed.dtype:
        if not base_out.is_contiguous():
            base_out = base_out.contiguous()  # written in place: base_out is this layer's own fresh tensor
        bgmv.bgmv_(base_out, x, bank.down, bank.up, ids, bank.slot_by_id, bank.ranks)  # type: ignore[arg-type]
        return base_out
    d_in, d_out = base.in_features, base.out_features
    slots = bank.slot_by_id[ids.to(bank.slot_by_id.device)]  # id -1 picks row 0, the zero row
    rows, rank = x.shape[0], bank.rank
    sel = bank.packed.index_select(0, slots)
    hidden = torch.bmm(x.reshape(rows, -1, d_in), sel[:, : d_in * rank].view(rows, rank, d_in).transpose(1, 2))
    up_t = sel[:, d_in * rank :].view(rows, rank, d_out)
    out = base_out.reshape(rows, -1, d_out)
    if torch.is_grad_enabled():
        return torch.baddbmm(out, hidden, up_t).view(base_out.shape)
    return out.baddbmm_(hidden, up_t).view(base_out.shape)  # base_out is this layer's own fresh tensor


def base_dtype(base: BaseView) -> torch.dtype:
    return base.dtype if base.dtype.is_floating_point else torch.float32
