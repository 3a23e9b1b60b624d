"""The one contract between the core and every method.

A method is an :class:`AdapterConfig` subclass (plain, JSON-serialisable settings) and an :class:`Adapter`
subclass (one instance per adapted base module, holding only its own tensors). The core calls nothing else:
injection, merging, saving, several adapters, mixed batches, serving and export all go through this class.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import typing
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from .base import BaseView
from .config import (  # the config half of the contract, re-exported: methods import it from here or core.api
    AdapterConfig,
)
from .errors import InvalidConfigError


def _identity(x: Tensor) -> Tensor:
    return x


def input_dropout(p: float) -> nn.Module | Callable[[Tensor], Tensor]:
    """Dropout on an adapter branch's input: ``nn.Dropout(p)``, or a plain identity function when ``p == 0``
    (not an ``nn.Identity`` child: one module less for every walk over the adapter — construction, ``.to``,
    train/eval, ``state_dict`` — which adds up when many adapters are added or loaded)."""
    return nn.Dropout(p) if p > 0 else _identity


@typing.runtime_checkable
class Initializer(typing.Protocol):
    """What ``pk.adapt(..., init=)`` and ``AdaptedModel.add_adapter(..., init=)`` accept (the data-aware
    initialisers are in :mod:`peftkit.init`)."""

    def prepare(self, config: AdapterConfig) -> AdapterConfig:
        """The config to build the adapter with (validate it; record the init in it)."""
        ...

    def apply(self, model: Any, name: str) -> None:
        """Write the initial values of adapter ``name`` of ``model`` (called right after it is built)."""
        ...


class LowRank(NamedTuple):
    """A low-rank form of an adapter's effect: ``Δy = scale · (x @ down.T) @ up.T``.

    ``down`` is ``[r, in]`` and ``up`` is ``[out, r]`` (canonical layout). Serving and mixed batches stack these
    into banks and run grouped matmuls.
    """

    down: Tensor
    up: Tensor
    scale: float


class SparseDelta(NamedTuple):
    """An update given entry by entry: ``ΔW[positions] = values``, zero elsewhere.

    ``positions`` is a tuple of index tensors into the canonical ``[out, in, *k]`` layout (one per dimension).
    Merging such an update touches only those entries (SHiRA's fast adapter switch).
    """

    positions: tuple[Tensor, ...]
    values: Tensor


_SKIP_INIT: contextvars.ContextVar[bool] = contextvars.ContextVar("peftkit_skip_init", default=False)


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Adapters constructed inside this block are allocated but not initialised (their
    :meth:`Adapter.reset_parameters` is not called): the core uses it when every saved tensor is about to be
    overwritten by values read from a file."""
    token = _SKIP_INIT.set(True)
    try:
        yield
    finally:
        _SKIP_INIT.reset(token)


class _AdapterType(type(nn.Module)):  # type: ignore[misc]
    """Construction = ``__init__`` (allocate) then ``reset_parameters(base)`` (initial values), unless inside
    :func:`skip_init`. So ``Method(base, config)`` always returns a ready adapter, and loading skips the init
    draws that the loaded values would overwrite."""

    def __call__(cls, base: BaseView, config: AdapterConfig, *args: Any, **kwargs: Any) -> Any:
        adapter = super().__call__(base, config, *args, **kwargs)
        if not _SKIP_INIT.get():
            with torch.no_grad():
                adapter.reset_parameters(base)
        return adapter


C = typing.TypeVar("C", bound=AdapterConfig)


class Adapter(nn.Module, typing.Generic[C], metaclass=_AdapterType):
    """One method's adaptation of one base module.

    Subclasses implement ``__init__`` (build tensors shaped from ``base``), :meth:`forward` and, where the
    method has one, :meth:`delta_weight`. Everything else has a default.

    Construction has two steps: ``__init__`` *allocates* (shapes, ``torch.empty``, and everything that is not
    saved: non-persistent buffers, bases derived from the base weight or a seed, plain attributes) and
    :meth:`reset_parameters` gives the *saved* tensors (``state_dict()``: parameters and persistent buffers)
    their initial values. ``Method(base, config)`` runs both. When an adapter is loaded from a file the core
    constructs it inside :func:`skip_init`, so ``reset_parameters`` is not called and the loaded values are
    copied into the allocated tensors. ``__init__`` must therefore not read the saved tensors' values, and
    must not call ``reset_parameters`` itself (that would initialise twice and shift seeded draws).

    Trainable tensors are ``nn.Parameter``; frozen tensors the method needs and must save are persistent
    buffers; tensors rebuilt from a seed are non-persistent buffers (never saved).

    Conformance declarations (class attributes) say which generic properties the spec exempts, each with the
    reason quoted from the spec, e.g. ``exempt = {"identity_at_init": "spec: FourierFT init is random"}``.
    """

    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    method: ClassVar[str] = ""
    # The layer kinds this method adapts: "linear" (nn.Linear, GPT-2 Conv1D), "conv2d", "embedding", and None for
    # a whole block (the weightless "module" kind: an MLP, a transformer block).
    kinds: ClassVar[frozenset[str | None]] = frozenset({"linear"})
    config: C
    exempt: ClassVar[dict[str, str]] = {}
    # True: forward is called as ``forward(x, base_out, base, context=...)`` with the call's
    # :class:`~peftkit.core.context.ForwardContext` (per-row task ids restricted to this adapter's rows, the
    # per-forward ``state`` dict shared by all layers): for methods whose update depends on the task (Poly/MHR)
    # or whose modules exchange values within one forward (Cloud-Adapter's image context).
    uses_context: ClassVar[bool] = False

    def __init__(self, base: BaseView, config: C) -> None:
        super().__init__()
        self.config = config

    # ----------------------------------------------------------------------------------------------- contract
    def reset_parameters(self, base: BaseView) -> None:
        """Initialise every tensor ``state_dict()`` saves (called once after ``__init__``, under ``no_grad``,
        inside the adapter's seeded RNG context; skipped when the values are loaded). Default: nothing (for
        methods whose ``__init__`` already sets every value; they then pay the init on loading too)."""

    @classmethod
    def supports(cls, base: nn.Module) -> bool:
        """Whether this method can adapt ``base``: by default, whether its layer kind is in :attr:`kinds`.
        Override only for conditions beyond the kind (a conv with groups, say)."""
        from .base import layer_kind

        return layer_kind(base) in cls.kinds

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        """The adapted output of the layer, given its input ``x`` and the frozen base output ``base_out``."""
        raise NotImplementedError

    def delta_weight(self, base: BaseView) -> Tensor | None:
        """``ΔW`` (canonical layout) such that the base op with ``W + ΔW`` equals :meth:`forward`; ``None`` if
        the method has no weight-space equivalent (then it cannot be merged)."""
        return None

    def delta_bias(self, base: BaseView) -> Tensor | None:
        """The bias change that goes with :meth:`delta_weight`, if the method changes the bias."""
        return None

    def lowrank(self, base: BaseView) -> LowRank | None:
        """The adapter as a low-rank product, for serving banks and grouped mixed batches; ``None`` if it is
        not one (then it runs through :meth:`forward`)."""
        return None

    @classmethod
    def expected_trainable(cls, base: BaseView, config: AdapterConfig) -> int:
        """The number of trainable parameters the spec's formula gives for this base module."""
        raise NotImplementedError

    def step(self, global_step: int) -> None:
        """Called once per optimizer step by the trainer (rank schedules and the like); default: nothing."""

    def sparse_delta(self, base: BaseView) -> SparseDelta | None:
        """Optional: :meth:`delta_weight` as entries, for updates that touch few weights. Merge and unmerge then
        cost ``O(entries)`` instead of a dense ``[out, in]`` pass. Default ``None``: merge the dense delta."""
        return None

    def fit_state(self, state: dict[str, Tensor]) -> None:
        """Reshape to a saved state before loading copies it in; ``state`` maps this module's ``state_dict``
        keys to the saved tensors. Default: nothing (a fresh module built from the config already has the saved
        shapes). Methods whose structure changes while training (IncreLoRA grows components) add what the
        saved state has, so a trained adapter reloads from its file with ``pk.load``."""

    def export_state(self) -> dict[str, Tensor]:
        """The tensors of this module in the form :meth:`AdapterConfig.export_config` describes (for foreign
        formats); by default its ``state_dict()``."""
        return self.state_dict()

    def effective_rank(self) -> int | None:
        """Optional: the rank this module's update currently has (learned, pruned or chosen), for rank
        reports (:func:`peftkit.train.ranks.rank_report`); ``None`` (default) when the method has no notion of
        rank. Rank-dynamic methods answer their live rank (DyLoRA: the eval rank, SoRA: nonzero gates)."""
        return None


def require_positive_int(name: str, value: object) -> None:
    """Config validation shared by methods: ``value`` must be an int (not a bool) greater than zero."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidConfigError(f"{name} must be a positive integer, got {value!r}")


def require_probability(name: str, value: float) -> None:
    """Config validation shared by methods: ``value`` must lie in ``[0, 1)`` (dropout-like rates)."""
    if not 0.0 <= value < 1.0:
        raise InvalidConfigError(f"{name} must lie in [0, 1), got {value!r}")


def seeded_generator(seed: int | None) -> torch.Generator | None:
    """A CPU generator seeded with ``seed`` (reproducible draws independent of the global RNG), or ``None`` to
    draw from the global RNG (which the core seeds with ``config.seed`` around construction)."""
    return None if seed is None else torch.Generator().manual_seed(seed)


def lowrank_pair(base: BaseView, r: int) -> tuple[nn.Parameter, nn.Parameter]:
    """The factors of a rank-``r`` update of ``base``, allocated (values are set in ``reset_parameters``):
    ``A [r, in]`` (down) and ``B [out, r]`` (up), canonical layout."""
    return nn.Parameter(torch.empty(r, base.in_features)), nn.Parameter(torch.empty(base.out_features, r))


@torch.no_grad()
def init_lora_pair(down: Tensor, up: Tensor) -> None:
    """LoRA's initial values (Hu et al., 2021; PEFT's default): ``A`` Kaiming-uniform with ``a = √5`` (as
    ``nn.Linear``), ``B = 0``, so the update starts at zero."""
    nn.init.kaiming_uniform_(down, a=math.sqrt(5))
    nn.init.zeros_(up)


def add_lowrank(base_out: Tensor, hidden: Tensor, up: Tensor, scale: float = 1.0) -> Tensor:
    """``base_out + scale · hidden @ upᵀ`` for ``hidden [..., r]`` and ``up [out, r]``: the up-projection of a
    low-rank branch fused into one ``addmm`` over the flattened leading dims, so no ``[tokens, out]``
    temporary is made besides the result (this is what keeps LoRA-family training memory at full-fine-tuning
    level)."""
    out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), up.T, alpha=scale)
    return out.view(base_out.shape)


def require_rank_fits(r: int, base: BaseView) -> None:
    """Config validation shared by low-rank methods: a rank-``r`` update must fit the layer, i.e.
    ``r <= min(fan_in, out)`` with ``fan_in = in · prod(kernel)``."""
    fan_in = base.in_features * math.prod(base.kernel_size)
    if r > min(fan_in, base.out_features):
        raise InvalidConfigError(
            f"r={r} is larger than this {base.kind} layer allows "
            f"(at most {min(fan_in, base.out_features)} for shape {base.weight_shape})"
        )
