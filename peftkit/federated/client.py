"""A client's local round: load the global adapter into the client's model, train the strategy's tensors on the
client's shard with peftkit's :class:`~peftkit.train.Trainer` (optionally with DP-SGD,
:mod:`peftkit.federated.privacy`), and return what it uploads.

:func:`local_update` is the whole round on an :class:`~peftkit.AdaptedModel`; :class:`ClientRuntime` is what a
client process keeps between rounds (the base model and the tokenised data, built once from the run's settings
with :func:`peftkit.train.build.build`, as ``peftkit train`` builds a run).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from peftkit.core.dense import FullConfig
from peftkit.core.model import AdaptedModel
from peftkit.federated.privacy import (
    PrivacySettings,
    client_delta,
    make_private,
    noise_multiplier,
    sample_rate,
)
from peftkit.federated.strategies import StrategySpec, get_strategy
from peftkit.train.config import TrainConfig
from peftkit.train.trainer import Trainer

ADAPTER = "default"
RESIDUAL = "fedex_residual"  # FedEx-LoRA: the residual folded into the frozen base, a dense frozen delta

__all__ = [
    "ADAPTER",
    "RESIDUAL",
    "ClientJob",
    "ClientRuntime",
    "LocalResult",
    "add_residual",
    "freeze_for",
    "heads",
    "local_update",
    "set_residual",
    "split_state",
]


@dataclass
class LocalResult:
    """What one client returns from a round.

    Attributes:
        state: the trained tensors (the strategy's ``trained`` names and the head's), to upload.
        num_examples: the client's training examples.
        metrics: ``train_loss``, ``steps`` and, with DP, ``epsilon`` / ``delta`` / ``noise_multiplier``.
    """

    state: dict[str, Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def heads(model: AdaptedModel, name: str = ADAPTER) -> list[str]:
    """Module paths of adapter ``name``'s task heads (``modules_to_save``): they train whole under every
    strategy."""
    config = model.configs[name]
    method = type(config).method
    return [path for path, module in model.adapter_modules(name).items() if module.method != method]


def split_state(state: Mapping[str, Tensor], spec: StrategySpec, head_paths: Sequence[str],
                ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:  # fmt: skip
    """``(trained, frozen)``: the tensors clients train and send each round, and those set once."""
    trained = {k: v for k, v in state.items() if spec.is_trained(k, head_paths)}
    return trained, {k: v for k, v in state.items() if k not in trained}


def freeze_for(model: AdaptedModel, spec: StrategySpec, name: str = ADAPTER) -> list[torch.nn.Parameter]:
    """Leave only the tensors ``spec`` trains trainable (FFA-LoRA's ``A``, FedEx's residual are frozen); returns
    them in ``adapter_state_dict`` order."""
    for p in model.parameters():
        p.requires_grad_(False)
    head_paths = heads(model, name)
    trained = []
    for path, module in model.adapter_modules(name).items():
        for key, p in module.named_parameters():
            if spec.is_trained(f"{path}.{key}", head_paths):
                p.requires_grad_(True)
                trained.append(p)
    return trained


def add_residual(model: AdaptedModel, paths: Sequence[str], name: str = ADAPTER) -> None:
    """Give ``model`` the FedEx-LoRA residual: a dense delta (the core's ``full`` method, zero at first, frozen)
    on the LoRA modules ``paths``, active together with adapter ``name``. The base weights stay untouched."""
    model.add_adapter(RESIDUAL, FullConfig(targets=list(paths)))
    model.set_adapter([name, RESIDUAL])


def set_residual(model: AdaptedModel, residual: Mapping[str, Tensor]) -> None:
    """Write FedEx-LoRA's residual (``{module path: [out, in]}``; modules left out: zero) into ``model``'s
    residual adapter."""
    values = {}
    for key, current in model.adapter_state_dict(RESIDUAL).items():
        path, _, name = key.rpartition(".")
        values[key] = residual[path] if name == "weight_delta" and path in residual else torch.zeros_like(current)
    model.assign_tensors(RESIDUAL, values, source="the FedEx-LoRA residual")


def local_update(
    model: AdaptedModel,
    spec: StrategySpec | str,
    state: Mapping[str, Tensor],
    data: Sequence[Any],
    config: TrainConfig,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    privacy: PrivacySettings | None = None,
    sigma: float | None = None,
    prior_steps: int = 0,
    name: str = ADAPTER,
    log: Callable[[str], None] | None = None,
) -> LocalResult:
    """One client round: assign ``state`` (the adapter's whole state: the global trained tensors and the frozen
    ones) to adapter ``name``, train the strategy's tensors on ``data`` with a fresh :class:`Trainer` (``config``;
    its AdamW state starts anew each round, as in FedAvg), and return the trained tensors.

    Args:
        privacy: DP-SGD settings; ``sigma`` is the noise multiplier (default: computed from ``privacy`` for
            ``config``'s steps only), ``prior_steps`` the DP steps this client took in earlier rounds (for the
            accountant).
    """
    spec = get_strategy(spec) if isinstance(spec, str) else spec
    model.assign_tensors(name, dict(state), source="the global adapter")
    freeze_for(model, spec, name)
    trainer = Trainer(model, config, data, collate_fn=collate_fn, log=log or (lambda message: None))
    metrics: dict[str, float] = {}
    if privacy is None:
        result = trainer.fit()
    else:
        n, steps = len(data), trainer.total_steps()
        rate, delta = sample_rate(n, config.batch_size), client_delta(privacy, n)
        sigma = sigma if sigma is not None else noise_multiplier(privacy, rate, steps, delta)
        with make_private(trainer, privacy, sigma, prior_steps=prior_steps, seed=config.seed) as engine:
            result = trainer.fit()
            eps = float(engine.get_epsilon(delta)) if prior_steps + result.global_step else 0.0
        metrics.update(epsilon=eps, delta=delta, noise_multiplier=sigma)
    metrics["train_loss"] = float(result.metrics.get("train_loss", math.nan))
    metrics["steps"] = float(result.global_step)
    head_paths = heads(model, name)
    trained = {k: v.detach().clone() for k, v in model.adapter_state_dict(name).items()
               if spec.is_trained(k, head_paths)}  # fmt: skip
    return LocalResult(trained, len(data), metrics)


@dataclass
class ClientJob:
    """What every client needs to take part (picklable; sent once to each simulated client process).

    Attributes:
        spec: the run's settings (:meth:`peftkit.train.settings.RunSpec.to_dict`, as the server built them).
        strategy: the strategy's name.
        shards: training-example indices of each client (partition id -> indices).
        model_digest: the base model's digest on the server (clients refuse another base).
        rounds: the number of rounds (for the DP budget).
        train: local :class:`TrainConfig` fields (epochs, batch size, lr ...; the seed varies per round).
        privacy: DP-SGD settings, or ``None``.
        sigmas: per client, the noise multiplier the server computed for the whole run.
        lowrank: the LoRA module paths (FedEx-LoRA's residual).
        threads: torch threads per client process (``None``: leave as is).
        drop: ``{partition id: round}``: that client fails in that round (failure injection for tests).
    """

    spec: dict[str, Any]
    strategy: str
    shards: list[list[int]]
    model_digest: str
    rounds: int
    train: dict[str, Any]
    privacy: PrivacySettings | None = None
    sigmas: list[float] | None = None
    lowrank: list[str] = field(default_factory=list)
    threads: int | None = None
    drop: dict[int, int] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Identifies what a client process builds for this job: the base model and data, and the adapted model's
        layout, which depends on the strategy (FedEx-LoRA's residual adapter on the ``lowrank`` modules). Two
        runs in one process (in-process federations, a SuperNode serving several runs) with the same data but
        another strategy must not share a runtime."""
        parts = [self.spec, self.model_digest, self.strategy, self.lowrank]
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def train_config(self, server_round: int, partition: int) -> TrainConfig:
        """The local training settings of client ``partition`` in round ``server_round`` (its own seed)."""
        seed = int(self.spec.get("seed", 0)) + 1000 * server_round + partition
        values = {**self.train, "seed": seed, "progress": False}
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return TrainConfig(**values)


_RUNTIMES: dict[str, ClientRuntime] = {}


@dataclass
class ClientRuntime:
    """A client process's base model, data and adapted model for one job (built once per process)."""

    job: ClientJob
    built: Any
    model: AdaptedModel

    @classmethod
    def get(cls, job: ClientJob) -> ClientRuntime:
        """The runtime of ``job`` in this process, built on first use.

        Raises:
            ValueError: this process's base model differs from the server's (another folder or weights).
        """
        runtime = _RUNTIMES.get(job.key)
        if runtime is None:
            from peftkit.train.build import build
            from peftkit.train.settings import RunSpec

            if job.threads is not None:
                torch.set_num_threads(job.threads)
            built = build(RunSpec.from_dict(job.spec), progress=False)
            if built.model_digest != job.model_digest:
                raise ValueError(
                    f"this client's base model {built.spec.model or 'all-MiniLM-L6-v2'} differs from the server's "
                    "(its weights' digest differs): every client must hold the same base model"
                )
            model = AdaptedModel(built.model)
            model.add_adapter(ADAPTER, built.adapter_config)
            if get_strategy(job.strategy).folds_residual:
                add_residual(model, job.lowrank)
            runtime = _RUNTIMES[job.key] = cls(job, built, model)
        return runtime

    def shard(self, partition: int) -> list[Any]:
        """The training examples of client ``partition``."""
        return [self.built.train[i] for i in self.job.shards[partition]]
