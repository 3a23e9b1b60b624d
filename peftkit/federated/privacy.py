"""Sample-level differential privacy for a client's local training: DP-SGD (Abadi et al., 2016, "Deep Learning
with Differential Privacy") through Opacus' ``PrivacyEngine`` (Yousefpour et al., 2021, "Opacus: User-Friendly
Differential Privacy Library in PyTorch"), as the official Fed-SB DP code does (``DP/SNLI/fed_trainer.py``).

Each optimizer step clips every example's gradient of the trainable adapter tensors to norm ``C`` and adds
``N(0, σ²C²)`` noise to their sum; the accountant (RDP by default) turns ``σ``, the sampling rate ``q`` and the
number of steps into ``(ε, δ)``. Only the trained tensors are noised: Fed-SB's ``R`` (``r²`` per layer) and a
task head, against ``r(d+k)`` per layer for LoRA's ``A`` and ``B``.

How per-example gradients are found: Opacus' own hooks cannot read peftkit's adapter modules (their forward
takes the base layer's view besides tensors, and LoRA-SB keeps ``A``, ``B`` as buffers), so
:class:`PerSampleGradients` computes them itself and Opacus runs in its ``no_op`` mode (it clips, noises, steps
and accounts; the gradients per example are ours). In each adapter module's backward, ``torch.func`` maps
``grad`` of the module's own forward over the batch, from the module's saved input and the gradient of its
output: exact per-example gradients for any adapter method (checked against one backward per example in the
tests). Decisions (inferred): the loss is a mean over the batch (Opacus' ``loss_reduction="mean"``); the batches
are the Trainer's shuffled fixed-size batches, and the accountant uses ``q = 1 / batches per epoch`` as Opacus
does with ``poisson_sampling=False``; adapter dropout must be 0 (a re-drawn mask would not match the forward);
one micro-batch per optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.core.protocol import Adapter
from peftkit.federated.errors import FederatedOptionError, PrivacyBudgetError

__all__ = [
    "PerSampleGradients",
    "PrivacySettings",
    "UserPrivacy",
    "client_delta",
    "epsilon_spent",
    "make_private",
    "noise_multiplier",
    "sample_rate",
]


@dataclass
class PrivacySettings:
    """Sample-level DP-SGD on every client.

    Attributes:
        epsilon: target ``ε`` for each client's data at the end of the whole run (all rounds); the noise
            multiplier is the smallest that reaches it (Opacus' ``get_noise_multiplier``). Give this or
            ``noise_multiplier``.
        noise_multiplier: ``σ`` (noise standard deviation over ``C``) instead of a target ``ε``.
        delta: ``δ``; default ``1 / n`` for a client with ``n`` examples (inferred; the official code uses
            ``1 / len(client_dataloader)``).
        max_grad_norm: ``C``, the per-example clipping norm (official Fed-SB DP default 0.1).
        accountant: Opacus accountant (``"rdp"``, ``"prv"`` or ``"gdp"``).
    """

    epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None
    max_grad_norm: float = 0.1
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise FederatedOptionError("DP needs exactly one of a target epsilon or a noise multiplier")
        for name in ("epsilon", "noise_multiplier", "delta", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise FederatedOptionError(f"DP {name} must be a positive number, got {value!r}")
        if self.delta is not None and self.delta >= 1:
            raise FederatedOptionError(f"DP delta must lie in (0, 1), got {self.delta}")
        if self.accountant not in ("rdp", "prv", "gdp"):
            raise FederatedOptionError(f"unknown accountant {self.accountant!r}; accountants: rdp, prv, gdp")


@dataclass
class UserPrivacy:
    """User-level (client-level) DP on the server with Flower's strategy wrappers (McMahan et al., 2018,
    "Learning Differentially Private Recurrent Language Models"; adaptive clipping: Andrew et al., 2021,
    "Differentially Private Learning with Adaptive Clipping"): each client's update is clipped to a norm and
    Gaussian noise ``N(0, (σ·clip / clients)²)`` is added to the average.

    Attributes:
        noise_multiplier: ``σ``.
        clipping_norm: the fixed clipping norm; ``None`` with ``adaptive``.
        adaptive: adapt the clipping norm towards the ``target_quantile`` of the update norms (starting from
            ``initial_clipping_norm``).
    """

    noise_multiplier: float
    clipping_norm: float | None = 1.0
    adaptive: bool = False
    initial_clipping_norm: float = 0.1
    target_quantile: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise FederatedOptionError(f"user-level DP needs a noise multiplier >= 0, got {self.noise_multiplier!r}")
        if not self.adaptive and not (self.clipping_norm is not None and self.clipping_norm > 0):
            raise FederatedOptionError(f"fixed clipping needs a positive clipping norm, got {self.clipping_norm!r}")

    def wrap(self, strategy: Any, clients: int) -> Any:
        """``strategy`` wrapped in Flower's server-side fixed or adaptive clipping strategy."""
        from flwr.serverapp.strategy import (
            DifferentialPrivacyServerSideAdaptiveClipping,
            DifferentialPrivacyServerSideFixedClipping,
        )

        if self.adaptive:
            return DifferentialPrivacyServerSideAdaptiveClipping(
                strategy, self.noise_multiplier, clients, initial_clipping_norm=self.initial_clipping_norm,
                target_clipped_quantile=self.target_quantile,
            )  # fmt: skip
        return DifferentialPrivacyServerSideFixedClipping(strategy, self.noise_multiplier, self.clipping_norm, clients)


def sample_rate(num_examples: int, batch_size: int) -> float:
    """``q = 1 / ceil(n / B)``: what Opacus' ``make_private`` uses for a loader of ``n`` examples in batches of
    ``B``."""
    return 1.0 / math.ceil(num_examples / batch_size)


def client_delta(settings: PrivacySettings, num_examples: int) -> float:
    """``δ`` for a client with ``num_examples`` examples (``settings.delta`` or ``1 / n``)."""
    return settings.delta if settings.delta is not None else 1.0 / max(num_examples, 2)


def noise_multiplier(settings: PrivacySettings, rate: float, steps: int, delta: float) -> float:
    """``σ``: ``settings.noise_multiplier``, or the smallest reaching ``settings.epsilon`` after ``steps`` DP-SGD
    steps at sampling rate ``rate``.

    Raises:
        PrivacyBudgetError: no noise level reaches the target (Opacus gives up at ``σ > 10⁶``).
    """
    if settings.noise_multiplier is not None:
        return float(settings.noise_multiplier)
    from opacus.accountants.utils import get_noise_multiplier

    assert settings.epsilon is not None
    try:
        sigma = get_noise_multiplier(
            target_epsilon=settings.epsilon,
            target_delta=delta,
            sample_rate=rate,
            steps=steps,
            accountant=settings.accountant,
        )
        return float(sigma)
    except ValueError as exc:
        raise PrivacyBudgetError(
            f"no noise level reaches epsilon={settings.epsilon:g} at delta={delta:.3g} after {steps} DP-SGD steps "
            f"at sampling rate {rate:.3g} (Opacus: {exc}): raise epsilon, or train fewer steps or rounds"
        ) from None


def epsilon_spent(sigma: float, rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """``ε`` the accountant reports after ``steps`` DP-SGD steps with noise ``sigma`` at sampling rate ``rate``."""
    if steps == 0:
        return 0.0
    from opacus.accountants.utils import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(sigma, rate, steps)]
    return float(acc.get_epsilon(delta=delta))


class PerSampleGradients:
    """Sets ``p.grad_sample`` (``[batch, *p.shape]``, the gradient of each example's own loss) for the trainable
    parameters of every adapter module of ``model`` during backward (see the module docstring). Use as a context
    manager or call :meth:`remove`."""

    def __init__(self, model: nn.Module) -> None:
        self._busy = False
        self._handles = [
            module.register_forward_hook(self._forward, with_kwargs=True)
            for module in model.modules()
            if isinstance(module, Adapter) and any(p.requires_grad for p in module.parameters())
        ]

    def _forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], out: Any) -> None:
        if self._busy or not torch.is_grad_enabled() or not module.training or not isinstance(out, Tensor):
            return
        if not out.requires_grad:
            return
        batch = args[0].shape[0]
        saved = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        out.register_hook(lambda grad: self._backward(module, saved, kwargs, grad, batch))

    def _backward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], grad: Tensor, batch: int) -> None:
        from torch.func import functional_call, vmap
        from torch.func import grad as grad_of

        params = {k: p.detach() for k, p in module.named_parameters() if p.requires_grad}
        batched = tuple(isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == batch for a in args)

        def loss(values: dict[str, Tensor], *inputs: Any) -> Tensor:
            *xs, g = inputs
            call = tuple(x.unsqueeze(0) if b else x for x, b in zip(xs, batched))
            return (functional_call(module, values, call, kwargs) * g.unsqueeze(0)).sum()

        in_dims = (None, *(0 if b else None for b in batched), 0)
        self._busy = True  # the functional call runs the module's forward hook again: skip it
        try:
            # loss_reduction="mean": the batch loss is the mean, so each example's own gradient is batch × its share
            grads = vmap(grad_of(loss), in_dims=in_dims)(params, *args, grad.detach() * batch)
        finally:
            self._busy = False
        named = dict(module.named_parameters())
        for key, value in grads.items():
            p = named[key]
            current = getattr(p, "grad_sample", None)
            p.grad_sample = value if current is None else current + value  # type: ignore[attr-defined]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> PerSampleGradients:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@contextmanager
def make_private(
    trainer: Any,
    settings: PrivacySettings,
    sigma: float,
    *,
    prior_steps: int = 0,
    seed: int | None = None,
) -> Iterator[Any]:
    """Make ``trainer`` (a :class:`peftkit.train.Trainer`) train with DP-SGD while the context is open; yields
    Opacus' ``PrivacyEngine``, whose accountant already holds ``prior_steps`` earlier steps of this client (the
    rounds before), so ``engine.get_epsilon(δ)`` is the client's ``ε`` so far.

    Raises:
        FederatedOptionError: adapter dropout, gradient accumulation or gradient clipping by the trainer (the
            DP optimizer clips per example instead).
    """
    from opacus import PrivacyEngine

    cfg = trainer.config
    if cfg.grad_accum != 1:
        raise FederatedOptionError("DP-SGD here takes one micro-batch per optimizer step: set grad_accum=1")
    if cfg.max_grad_norm is not None:
        raise FederatedOptionError("with DP the optimizer clips per example: set the trainer's max_grad_norm=None")
    dropout = [m for m in trainer.model.modules() if isinstance(m, Adapter) and getattr(m.config, "dropout", 0)]
    if dropout:
        raise FederatedOptionError(
            f"DP-SGD needs adapter dropout 0 (got {dropout[0].config.dropout}): per-example gradients are "
            "recomputed from the module's input, and a re-drawn dropout mask would not match the forward"
        )
    n = len(trainer.train_data)
    rate = sample_rate(n, cfg.batch_size)
    engine = PrivacyEngine(accountant=settings.accountant)
    if prior_steps:
        engine.accountant.history = [(sigma, rate, prior_steps)]
    loader = torch.utils.data.DataLoader(range(n), batch_size=cfg.batch_size)  # only its length is used: q
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    plain = trainer.optimizer
    with PerSampleGradients(trainer.model):
        hooks, optimizer, _ = engine.make_private(
            module=trainer.model, optimizer=plain, data_loader=loader, noise_multiplier=sigma,
            max_grad_norm=settings.max_grad_norm, poisson_sampling=False, grad_sample_mode="no_op",
            wrap_model=False, noise_generator=generator,
        )  # fmt: skip
        trainer.optimizer = optimizer
        try:
            yield engine
        finally:
            trainer.optimizer = plain
            for p in trainer.params:
                p.grad_sample = None  # type: ignore[attr-defined]
            hooks.cleanup() if hasattr(hooks, "cleanup") else None
