"""Data-aware initialisers: set an adapter's initial values from the base weights or calibration data.

    model = pk.adapt(base, pk.LoRAConfig(r=8, targets="all-linear"), init="pissa")
    model = pk.adapt(base, pk.LoRAConfig(r=8), init=pk.init.LoRAGA(batches))
    model.add_adapter("forget", pk.LoRAConfig(r=8), init=pk.init.LoKU(forget_batches, retain_batches))
    model = pk.adapt(base, pk.get_config("lorasb", r=8, alpha=8), init=pk.init.LoRASB(batches, total_steps=1000))

An initialiser is any object with the two methods of :class:`Initializer`: ``prepare(config)`` returns the
config the adapter is built with (residual inits record their name in ``LoRAConfig.init``, so a saved adapter
reloads with its residual offset buffers) and ``apply(model, name)`` writes the initial values once the adapter
exists. Residual inits (PiSSA, LoRA-GA, LoKU) never modify the base weights: see :mod:`peftkit.methods.lora`.
Papers: PiSSA (Meng et al., 2024), LoRA-GA (Wang et al., 2024), LoKU/FILA (Cha et al., 2025), LoRA-SB
(Ponkshe et al., 2024).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from peftkit.core.errors import InvalidConfigError
from peftkit.core.protocol import AdapterConfig
from peftkit.methods.lora import LoRAConfig

if TYPE_CHECKING:
    from peftkit.core.model import AdaptedModel


@runtime_checkable
class Initializer(Protocol):
    """What ``pk.adapt(..., init=)`` and ``AdaptedModel.add_adapter(..., init=)`` accept."""

    def prepare(self, config: AdapterConfig) -> AdapterConfig:
        """The config to build the adapter with (validate it; record the init in it)."""
        ...

    def apply(self, model: AdaptedModel, name: str) -> None:
        """Write the initial values of adapter ``name`` of ``model`` (called right after it is built)."""
        ...


def residual_config(config: AdapterConfig, init: str) -> LoRAConfig:
    """``config`` with ``init`` recorded; residual initialisers adapt with (plain) LoRA only."""
    if not isinstance(config, LoRAConfig):
        raise InvalidConfigError(
            f"init {init!r} initialises a LoRA adapter; got a {type(config).__name__} (method {type(config).method!r})"
        )
    return config.replace(init=init)  # type: ignore[return-value]


class PiSSA:
    """PiSSA (Meng et al., 2024): principal singular components of ``W`` in ``A``, ``B``, residual offset.

    Weight-only, so the work happens when the adapter is built (``LoRA.reset_parameters``, formulas in
    :func:`peftkit.methods.lora.pissa_factors`); this object only records ``init="pissa"`` (exact SVD) or
    ``"pissa_niter_<K>"`` (``torch.svd_lowrank`` with ``K`` subspace iterations; seed it with ``config.seed``).
    ``init="pissa"`` / ``"pissa_niter_4"`` strings are shorthands for it.
    """

    def __init__(self, niter: int | None = None) -> None:
        if niter is not None and (not isinstance(niter, int) or isinstance(niter, bool) or niter < 1):
            raise InvalidConfigError(f"niter must be a positive integer or None (exact SVD), got {niter!r}")
        self.niter = niter

    @property
    def name(self) -> str:
        return "pissa" if self.niter is None else f"pissa_niter_{self.niter}"

    def prepare(self, config: AdapterConfig) -> AdapterConfig:
        return residual_config(config, self.name)

    def apply(self, model: AdaptedModel, name: str) -> None:
        """Nothing left to do: the SVD ran when the adapter was built."""


def as_initializer(init: Initializer | str) -> Initializer:
    """An :class:`Initializer` from an object or a name (``"pissa"``, ``"pissa_niter_<K>"``; the data-aware
    ones need their calibration batches, so they are passed as objects)."""
    if isinstance(init, str):
        if init == "pissa":
            return PiSSA()
        if init.startswith("pissa_niter_") and init[len("pissa_niter_") :].isdigit():
            return PiSSA(int(init[len("pissa_niter_") :]))
        raise InvalidConfigError(
            f"unknown init {init!r}: use 'pissa', 'pissa_niter_<K>', or an initialiser object such as "
            "pk.init.LoRAGA(batches), pk.init.LoKU(forget, retain) or pk.init.LoRASB(batches, total_steps=...)"
        )
    if not isinstance(init, Initializer):
        raise InvalidConfigError(f"init must be a name or have prepare(config) and apply(model, name), got {init!r}")
    return init


from peftkit.init.loku import LoKU, fila_factors, inverted_hinge_loss  # noqa: E402
from peftkit.init.lora_ga import LoRAGA, lora_ga_factors  # noqa: E402
from peftkit.init.lorasb import LoRASB, lorasb_factors  # noqa: E402

__all__ = [
    "Initializer",
    "LoKU",
    "LoRAGA",
    "LoRASB",
    "PiSSA",
    "as_initializer",
    "fila_factors",
    "inverted_hinge_loss",
    "lora_ga_factors",
    "lorasb_factors",
    "residual_config",
]
