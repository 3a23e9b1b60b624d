"""What one forward call of an ``AdaptedModel`` carries to its layers and adapters, and how its per-row
arguments are checked.

``model(**batch, adapter_ids=..., task_ids=...)`` builds one :class:`ForwardContext`, puts it on the model's
``Routing`` for the duration of the call, and drops it afterwards, so nothing of one call outlives it.
Adapters that declare ``uses_context = True`` get it as ``forward(x, base_out, base, context=...)``, restricted to
the rows they run on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .errors import AdapterIdsError, ForwardContextError

_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
PEFT_BASE_ROW = "__base__"  # PEFT's adapter_names entry for rows that run the base model alone


@dataclass
class ForwardContext:
    """The per-call inputs of one forward.

    Attributes:
        adapter_ids: one adapter id per batch row (``-1``: the base alone), or ``None`` (the active adapters run
            on every row).
        shared_id: the id every row of ``adapter_ids`` has, if they all have the same one (``None`` otherwise):
            such a batch runs the single-adapter path, with no per-row grouping or gather.
        task_ids: one task id per row (``model(..., task_ids=ids)``), for methods whose adapter depends on the
            task a row belongs to (Poly/MHR); independent of ``adapter_ids``. An adapter sees the ids of its own
            rows; ``None`` when the call gave none.
        state: values adapters hand each other within this forward (an adapter on the patch embedding
            publishes an image context that adapters at later blocks read); keys are the methods' business.
    """

    adapter_ids: Tensor | None = None
    shared_id: int | None = None
    task_ids: Tensor | None = None
    state: dict[str, Any] = field(default_factory=dict)

    def publish(self, key: str, value: Tensor) -> None:
        """Hand ``value`` (first dimension: the batch rows) to the adapters that run later in this forward."""
        self.state[key] = value

    def published(self, key: str, rows: int, producer: str) -> Tensor:
        """What an earlier adapter of this forward published under ``key``, for a batch of ``rows`` rows.

        Raises:
            ForwardContextError: nothing is published under ``key`` in this forward, or it has another number of
                rows; ``producer`` (the module that must run first) goes into the message.
        """
        value = self.state.get(key)
        if value is None or value.shape[0] != rows:
            found = "nothing" if value is None else f"a value for {value.shape[0]} rows"
            raise ForwardContextError(
                f"found {found} under {key!r} for this batch of {rows} rows: {producer} must run earlier in the "
                "same forward"
            )
        return value

    def for_rows(self, rows: Tensor | None) -> ForwardContext:
        """This context as the adapter running on batch rows ``rows`` (all rows: ``None``) sees it."""
        if rows is None or self.task_ids is None:
            return self
        return replace(self, task_ids=self.task_ids[rows.to(self.task_ids.device)])

    def repeated(self, times: int) -> ForwardContext:
        """Each row repeated ``times`` times in place (``generate``'s beams and return sequences), with a fresh
        ``state`` (one per forward)."""

        def rep(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.repeat_interleave(times)

        return ForwardContext(rep(self.adapter_ids), self.shared_id, rep(self.task_ids))


def batch_rows(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """The batch size of a forward call: the first dimension of its first tensor argument."""
    first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
    return int(first.shape[0]) if first is not None and first.dim() > 0 else None


def peft_adapter_names(adapter_ids: Any, kwargs: dict[str, Any]) -> Any:
    """PEFT's ``adapter_names=`` (names, ``"__base__"`` for the base model), popped from ``kwargs``, as
    ``adapter_ids``."""
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return adapter_ids
    if adapter_ids is not None:
        raise AdapterIdsError("give adapter_ids or PEFT's adapter_names, not both")
    return [None if n == PEFT_BASE_ROW else n for n in names]


def check_adapter_ids(
    ids: Tensor | Sequence[int | str | None], order: Sequence[str], rows: int | None
) -> tuple[Tensor, int | None]:
    """``adapter_ids`` as a long tensor (names looked up in ``order``, ``None`` as ``-1``), and the id all rows
    share (``None`` if they differ or there are none).

    Raises:
        AdapterIdsError: a wrong dtype, shape, range or length (``rows``: the batch size, if known).
        AdapterNotFoundError: a name the model does not hold.
    """
    if not isinstance(ids, Tensor):
        ids = torch.tensor([_id_of(i, order) for i in ids], dtype=torch.long)
    if ids.dtype not in _INTEGER_DTYPES:
        raise AdapterIdsError(f"adapter_ids must be an integer tensor, got dtype {ids.dtype}")
    if ids.dim() != 1:
        raise AdapterIdsError(f"adapter_ids must be 1-D (one id per batch row), got shape {tuple(ids.shape)}")
    lo, hi = (int(ids.min()), int(ids.max())) if ids.numel() else (0, -1)
    if ids.numel() and (lo < -1 or hi >= len(order)):
        held = list(order)
        raise AdapterIdsError(
            f"adapter_ids must lie in [-1, {len(order) - 1}] (the model holds {held}), got values in [{lo}, {hi}]"
        )
    if rows is not None and rows != ids.shape[0]:
        raise AdapterIdsError(f"adapter_ids has {ids.shape[0]} entries but the batch has {rows} rows")
    return ids.long(), (lo if lo == hi else None)


def check_task_ids(ids: Tensor | Sequence[int], rows: int | None) -> Tensor:
    """``task_ids`` as a long tensor.

    Raises:
        AdapterIdsError: a wrong dtype, shape, a negative id, or a length other than ``rows``.
    """
    if not isinstance(ids, Tensor):
        ids = torch.tensor(list(ids), dtype=torch.long)
    if ids.dtype not in _INTEGER_DTYPES:
        raise AdapterIdsError(f"task_ids must be an integer tensor, got dtype {ids.dtype}")
    if ids.dim() != 1:
        raise AdapterIdsError(f"task_ids must be 1-D (one task per batch row), got shape {tuple(ids.shape)}")
    if ids.numel() and int(ids.min()) < 0:
        raise AdapterIdsError(f"task_ids must be non-negative, got {int(ids.min())}")
    if rows is not None and rows != ids.shape[0]:
        raise AdapterIdsError(f"task_ids has {ids.shape[0]} entries but the batch has {rows} rows")
    return ids.long()


def _id_of(item: int | str | None, order: Sequence[str]) -> int:
    if item is None:
        return -1
    if isinstance(item, str):
        if item not in order:
            from .errors import AdapterNotFoundError

            raise AdapterNotFoundError(item, order)
        return list(order).index(item)
    return int(item)
