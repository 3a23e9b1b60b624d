"""peftkit.train.helpers: batches, and the signal flag that lets a run finish its step and checkpoint."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from peftkit.train.helpers import SignalFlag, batch_size_of, default_loss, to_device


def test_first_signal_sets_the_flag_second_interrupts_handlers_restored() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    flag = SignalFlag()
    with flag.installed(True):
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    off = SignalFlag()
    with off.installed(False):
        assert signal.getsignal(signal.SIGTERM) == before[0]


def test_batches() -> None:
    batch = {"x": torch.zeros(3, 2), "labels": torch.zeros(3)}
    assert batch_size_of(batch) == 3 and batch_size_of([torch.tensor(1.0), torch.zeros(4, 1)]) == 4
    assert to_device(batch, "cpu")["x"].device.type == "cpu" and to_device(batch, None) is batch
    with pytest.raises(TypeError, match="has no 'loss'"):
        default_loss(torch.nn.Linear(2, 2), torch.zeros(1, 2))
