"""Everything a method file needs, in one import::

    from peftkit.core.api import Adapter, AdapterConfig, BaseView, LowRank, PositiveInt, register

The protocol (:class:`Adapter`, :class:`AdapterConfig` and their types), the view of the base module, the
bounded field types configs declare, the registry decorator, the per-call context, the errors methods raise,
and the small helpers many methods share. Nothing here is specific to one method.
"""

from __future__ import annotations

from .base import BaseView, LayerKind, ModuleView, layer_kind
from .config import (
    AdapterConfig,
    Bound,
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveFraction,
    PositiveInt,
    Probability,
    RankConfig,
)
from .context import ForwardContext
from .errors import (
    AdapterIdsError,
    InvalidConfigError,
    NotMergeableError,
    PeftkitError,
    TargetModuleNotFound,
    UnsupportedLayerError,
)
from .inject import find_targets
from .model import AdaptedModel
from .protocol import (
    Adapter,
    LowRank,
    SparseDelta,
    add_lowrank,
    init_lora_pair,
    input_dropout,
    lowrank_pair,
    require_rank_fits,
    seeded_generator,
)
from .registry import register

__all__ = [
    "AdaptedModel",
    "Adapter",
    "AdapterConfig",
    "AdapterIdsError",
    "BaseView",
    "Bound",
    "ForwardContext",
    "Fraction",
    "InvalidConfigError",
    "LayerKind",
    "LowRank",
    "ModuleView",
    "NonNegativeFloat",
    "NonNegativeInt",
    "NotMergeableError",
    "PeftkitError",
    "PositiveFloat",
    "PositiveFraction",
    "PositiveInt",
    "Probability",
    "RankConfig",
    "SparseDelta",
    "TargetModuleNotFound",
    "UnsupportedLayerError",
    "add_lowrank",
    "find_targets",
    "init_lora_pair",
    "input_dropout",
    "layer_kind",
    "lowrank_pair",
    "register",
    "require_rank_fits",
    "seeded_generator",
]
