"""Counting the calls of peftkit's C++ mixed-batch kernel (the bank calls it through ``peftkit.core.bgmv``)."""

from __future__ import annotations

import pytest

from peftkit.core import bgmv


def count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Record (tokens, rows) of every call of the C++ kernel from now on (the list fills as calls come)."""
    calls: list[tuple[int, int]] = []
    original = bgmv.bgmv_

    def counted(out, x, down, up, ids, slot_of_id, ranks) -> None:
        calls.append((out.numel() // out.shape[-1], ids.numel()))  # out: [..., N]
        original(out, x, down, up, ids, slot_of_id, ranks)

    monkeypatch.setattr(bgmv, "bgmv_", counted)
    return calls
