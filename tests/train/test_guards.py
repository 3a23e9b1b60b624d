"""peftkit.train.guards: the gradient norm and the divergence rule's state (the rest is covered through the
Trainer in tests/integration/test_trainer.py)."""

from __future__ import annotations

import pytest
import torch

from peftkit.train import TrainConfig, TrainingDivergedError
from peftkit.train.guards import DivergenceCheck, grad_norm


def test_grad_norm_measures_overflowing_squares_in_float64() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3e20, 4e20, 0.0])  # squares overflow float32
    assert grad_norm([p]) == pytest.approx(5e20, rel=1e-6)
    p.grad = torch.tensor([1.0, float("nan"), 0.0])
    assert grad_norm([p]) != grad_norm([p])  # NaN


def test_divergence_state_round_trips() -> None:
    cfg = TrainConfig(divergence_window=2, divergence_patience=2)
    whole, split = DivergenceCheck(cfg), DivergenceCheck(cfg)
    losses = [1.0, 5.0, 30.0, 40.0, 50.0, 60.0]  # windows of 2: means 3, 35, 55 against 10x the first loss
    for step, loss in enumerate(losses[:3], start=1):
        whole.update(step, loss)
        split.update(step, loss)
    resumed = DivergenceCheck(cfg)
    resumed.load_state_dict(split.state_dict())
    for check in (whole, resumed):
        check.update(4, losses[3])
        check.update(5, losses[4])
        with pytest.raises(TrainingDivergedError, match="from step 3 to step 6"):
            check.update(6, losses[5])
