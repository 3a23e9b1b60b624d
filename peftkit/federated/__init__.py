"""Federated fine-tuning of adapters: Fed-SB, FedAvg-LoRA (FedIT), FFA-LoRA and FedEx-LoRA on Flower.

    from peftkit.federated import federate, fedsb
    result = federate("runs/fed", strategy="fedsb", clients=10, rounds=3, split="dirichlet:0.5", r=32)

* :mod:`~peftkit.federated.aggregate`: the aggregation functions over adapter state dicts (no Flower).
* :mod:`~peftkit.federated.strategies`: the four strategies as data (method, trained tensors, aggregation,
  communication per round).
* :mod:`~peftkit.federated.split`: iid, contiguous and Dirichlet label-skew splits.
* :mod:`~peftkit.federated.client`: a client's round with peftkit's Trainer.
* :mod:`~peftkit.federated.privacy`: sample-level DP-SGD with Opacus; user-level DP with Flower's wrappers.
* :mod:`~peftkit.federated.flower` (needs ``flwr``): the Flower Strategy and ClientApp.
* :mod:`~peftkit.federated.run` (needs ``flwr[simulation]``): :func:`federate` (``peftkit federate``) on Flower's
  simulation engine, or in this process (``engine="inprocess"``: :mod:`~peftkit.federated.inprocess`, the same
  strategy and ClientApp without Ray).
* :mod:`~peftkit.federated.deploy`: the same run as separate processes (a SuperLink and one SuperNode per client,
  e.g. on loopback with :class:`~peftkit.federated.deploy.LocalDeployment`); see that module for the commands.

The Flower parts import ``flwr`` (``pip install 'peftkit[federated]'``); everything else works without it.
Importing this package sets ``FLWR_TELEMETRY_ENABLED=0`` unless it is set (Flower's usage telemetry is on by
default and writes an id into ``~/.flwr``).
"""

from __future__ import annotations

import os
from typing import Any

# Flower sends usage telemetry and keeps an id in ~/.flwr unless told not to (read when flwr is imported, which
# peftkit.federated's Flower modules do after this): off unless the user set it.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from peftkit.federated.aggregate import Aggregate, Residual, cross_term, fedavg, fedex, fedsb, ffa
from peftkit.federated.client import LocalResult, local_update
from peftkit.federated.errors import (
    AdapterMismatchError,
    EmptyClientError,
    FederatedError,
    FederatedOptionError,
    PrivacyBudgetError,
    UnknownStrategyError,
)
from peftkit.federated.privacy import PrivacySettings, UserPrivacy
from peftkit.federated.split import parse_split, partition
from peftkit.federated.strategies import STRATEGIES, StrategySpec, get_strategy

__all__ = [
    "STRATEGIES",
    "AdapterMismatchError",
    "Aggregate",
    "EmptyClientError",
    "FederatedError",
    "FederatedOptionError",
    "LocalResult",
    "PrivacyBudgetError",
    "PrivacySettings",
    "Residual",
    "StrategySpec",
    "UnknownStrategyError",
    "UserPrivacy",
    "cross_term",
    "fedavg",
    "federate",
    "fedex",
    "fedsb",
    "ffa",
    "get_strategy",
    "local_update",
    "parse_split",
    "partition",
]


def federate(*args: Any, **kwargs: Any) -> Any:
    """:func:`peftkit.federated.run.federate` (imported on use: it needs ``flwr[simulation]``)."""
    from peftkit.federated.run import federate as run

    return run(*args, **kwargs)
