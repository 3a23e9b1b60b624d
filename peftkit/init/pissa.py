"""PiSSA (Meng et al., 2024): the weight-only residual initialisation, and what every residual init shares."""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftkit.core.config import AdapterConfig
from peftkit.core.errors import InvalidConfigError
from peftkit.core.protocol import Initializer
from peftkit.core.registry import register_init_names
from peftkit.methods.lora import LoRAConfig

if TYPE_CHECKING:
    from peftkit.core.model import AdaptedModel


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


def _named(init: str) -> Initializer | None:
    """The initialiser a name stands for (``"pissa"``, ``"pissa_niter_<K>"``); the data-aware ones need their
    calibration batches, so they are passed as objects."""
    if init == "pissa":
        return PiSSA()
    if init.startswith("pissa_niter_") and init[len("pissa_niter_") :].isdigit():
        return PiSSA(int(init[len("pissa_niter_") :]))
    return None


register_init_names(_named)
