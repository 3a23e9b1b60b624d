"""Helpers of the training loop: batches (loss, size, device), seeds, the checkpoint folder, and the SIGINT /
SIGTERM flag that lets a run stop after its current step with a checkpoint."""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

Batch = Any


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Call the model on the batch (``**dict``, ``*tuple`` or one tensor) and take its ``loss``."""
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    if isinstance(out, Mapping) and "loss" in out:
        return out["loss"]
    if getattr(out, "loss", None) is not None:
        return out.loss
    if isinstance(out, Tensor) and out.dim() == 0:
        return out
    raise TypeError("the model's output has no 'loss' (pass labels in the batch, or give Trainer a loss_fn)")


def batch_size_of(batch: Batch) -> int:
    """Number of rows in a batch (the first dimension of its first tensor)."""
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    return next((int(t.shape[0]) for t in items if isinstance(t, Tensor) and t.dim() > 0), 0)


def to_device(batch: Batch, device: str | torch.device | None) -> Batch:
    """Move every tensor of a batch (dict, tuple, list or tensor) to ``device``."""
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def prepare_output_dir(path: str | Path) -> Path:
    """Create the checkpoint folder ``path`` before training, so that a path that cannot hold the checkpoints
    fails now rather than at the first checkpoint: a file, or a folder that is not writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"output_dir {path} is a file, not a folder: the checkpoints cannot be written there")
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"output_dir {path} is not writable")
    return path


class SignalFlag:
    """Turns the first SIGINT / SIGTERM into a flag the loop reads after each optimizer step; a second one
    interrupts at once (the default behaviour). Installed only in the main thread, restored afterwards."""

    def __init__(self) -> None:
        self.name: str | None = None

    @contextmanager
    def installed(self, enabled: bool) -> Iterator[None]:
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handle(signum: int, frame: Any) -> None:
            if self.name is not None:  # second signal: stop now, the last checkpoint stays as it is
                signal.signal(signum, previous[signum])
                raise KeyboardInterrupt
            self.name = signal.Signals(signum).name

        for s in previous:
            signal.signal(s, handle)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
