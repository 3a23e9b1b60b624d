"""``BatchedKV``: the key/value cache of the running requests, one batched cache for the decode steps.

After its prefill each request keeps its own cache (one ``(key, value)`` pair per layer, ``[1, heads, L,
head_dim]``, cut to its prompt length). Decode runs all running requests together on one batched cache: their
caches are left-padded with zeros to the longest one and stacked, the attention mask is 0 on the padding and
``position_ids`` are each request's true position, so every row computes exactly what it would compute alone
(masked keys get weight exactly 0). The stacked cache is rebuilt only when a request joins or leaves; between
such changes each step passes on the cache the previous step returned. Re-stacking costs one copy of the caches
per change of the batch; a paged KV pool (S-LoRA's unified paging, Sheng et al. 2024) is the faster design for
accelerators.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["KV", "BatchedKV", "cache_of"]

KV = list[tuple[Tensor, Tensor]]


class BatchedKV:
    """The KV cache of every running request, keyed by the request (any hashable row owner).

    Args:
        cache_kw: the keyword the model's ``forward`` takes its cache by (``past_key_values`` or ``cache``).
    """

    def __init__(self, cache_kw: str = "past_key_values") -> None:
        self.cache_kw = cache_kw
        self._own: dict[Hashable, KV] = {}  # prefill caches of requests not yet in the stacked cache
        self._len: dict[Hashable, int] = {}  # tokens in each request's cache
        self.rows: list[Any] = []  # the requests' order in the stacked cache
        self._cache: Any = None
        self._mask = torch.zeros(0, 0, dtype=torch.long)

    def __contains__(self, req: object) -> bool:
        """Whether any cache is held for ``req`` (its own or its row of the stacked one)."""
        return req in self._len

    def length(self, req: Hashable) -> int:
        """Tokens in ``req``'s cache (its position in the sequence)."""
        return self._len[req]

    def add_prefill(self, reqs: Sequence[Hashable], output: Any, lens: Sequence[int]) -> None:
        """Keep each request's slice of a prefill's cache (row ``i`` of ``output``'s cache, cut to ``lens[i]``)."""
        kv = _kv_of(cache_of(output))
        for i, (req, n) in enumerate(zip(reqs, lens)):
            self._own[req], self._len[req] = [(k[i : i + 1, :, :n], v[i : i + 1, :, :n]) for k, v in kv], n

    def drop(self, req: Hashable) -> None:
        """Forget ``req``'s cache (a finished request; its row leaves the stacked cache at the next rebuild)."""
        self._own.pop(req, None)
        self._len.pop(req, None)

    def clear(self) -> None:
        """No running request: drop the stacked cache."""
        self.rows, self._cache = [], None

    def step_inputs(self, batch: Sequence[Any]) -> tuple[list[Any], dict[str, Any]]:
        """The rows' order and the model inputs for one decode step of ``batch`` (the running requests):
        ``attention_mask``, ``position_ids`` and the cache, stacked anew if the batch changed."""
        if self._cache is None or set(batch) != set(self.rows):
            self._rebuild(batch)
        rows = self.rows
        mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        positions = torch.tensor([[self._len[r]] for r in rows])
        return rows, {"attention_mask": mask, "position_ids": positions, self.cache_kw: self._cache}

    def advance(self, output: Any, inputs: dict[str, Any]) -> None:
        """After the decode step that took ``inputs``: its returned cache is the batch's cache now, one token
        longer in every row."""
        self._cache, self._mask = cache_of(output), inputs["attention_mask"]
        for r in self.rows:
            self._len[r] += 1

    def _rebuild(self, batch: Sequence[Any]) -> None:
        """Stack the caches of ``batch`` into one left-padded cache and its attention mask; :attr:`rows` becomes
        the rows' order in it (the requests already in the previous cache first, then the new ones).

        Rows that stay are taken out of the previous batched cache with one ``index_select`` per layer (keeping
        its last ``longest`` positions: each row's own positions are its last ``length(row)``); new rows bring
        their own prefill cache."""
        from transformers import DynamicCache

        previous = {r: i for i, r in enumerate(self.rows)}
        old = _kv_of(self._cache) if self._cache is not None else []
        stay = [r for r in batch if r not in self._own]
        new = [r for r in batch if r in self._own]
        longest = max(self._len[r] for r in batch)
        index = torch.tensor([previous[r] for r in stay], dtype=torch.long)
        n_layers = len(old) if old else len(self._own[new[0]])
        layers = []
        for layer in range(n_layers):
            pair = []
            for j in range(2):  # keys, values
                parts = [_left_pad(old[layer][j].index_select(0, index), longest)] if stay else []
                parts += [_left_pad(self._own[r][layer][j], longest) for r in new]
                pair.append(torch.cat(parts) if len(parts) > 1 else parts[0])
            layers.append((pair[0], pair[1]))
        rows = stay + new  # the rows' order in the stacked cache (the decode step follows it)
        mask = torch.zeros(len(rows), longest, dtype=torch.long)
        for i, r in enumerate(rows):
            mask[i, longest - self._len[r] :] = 1
        for r in new:
            del self._own[r]  # it lives in the batched cache now
        self.rows, self._cache, self._mask = rows, DynamicCache(ddp_cache_data=layers), mask


def cache_of(output: Any) -> Any:
    """The cache a transformers model's forward returned."""
    cache = getattr(output, "past_key_values", None)
    return cache if cache is not None else getattr(output, "cache", None)


def _kv_of(cache: Any) -> KV:
    """Per-layer ``(key, value)`` tensors of a transformers ``DynamicCache``."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _left_pad(t: Tensor, length: int) -> Tensor:
    """``t`` ``[batch, heads, L, dim]`` cut or zero-padded on the left to ``length`` positions."""
    missing = length - t.shape[2]
    if missing <= 0:
        return t[:, :, -missing:] if missing else t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], missing, t.shape[3]), t], dim=2)
