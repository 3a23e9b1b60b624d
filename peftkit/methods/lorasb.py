"""LoRA-SB (Ponkshe et al., 2024, "Initialization using Update Approximation is a Silver Bullet for Extremely
Efficient Low-Rank Fine-Tuning"; official code RaghavSinghal10/lora-sb).

Exactly the LoRA-XS architecture (frozen ``A [r, in]``,
``B [out, r]``, trainable ``R [r, r]``, ``y = base(x) + s · B R A drop(x)``) with ``α = r`` forced (``s = 1``)
and the update-approximation initialisation, which needs gradients and therefore lives in
:class:`peftkit.init.LoRASB`: ``A = U_inᵀ``, ``B = V_out``, ``R = diag(S)`` from the truncated SVD of the
approximated first update. ``W`` is not reduced, so the adapted model starts one approximate step ahead: not
the identity at init (by design). Built without that initialiser (decision, inferred), the adapter starts as
LoRA-XS with ``s = 1`` (SVD factors of ``W``, ``R ~ N(0, 1e-5²)``), so it is always well-defined; ``A``,
``B`` and ``R`` are all saved, so a LoRA-SB adapter reloads exactly onto the untouched base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from peftkit.core.api import InvalidConfigError, register

from .loraxs import LoRAXS, LoRAXSConfig


@dataclass(kw_only=True)
class LoRASBConfig(LoRAXSConfig):
    """Settings of LoRA-SB.

    Attributes:
        r: rank of the frozen bases; ``R`` has ``r²`` trainable entries (paper: 96 for Mistral-7B arithmetic).
        alpha: must equal ``r`` (the paper fixes ``α = r``, ``s = 1``); left out, it follows ``r``.
        dropout: dropout on the adapter branch's input (spec default 0).
    """

    alpha: float = None  # type: ignore[assignment]  # None -> r, set in __post_init__

    def __post_init__(self) -> None:
        if self.alpha is None:
            self.alpha = float(self.r) if isinstance(self.r, int) else self.r
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        if self.alpha != self.r:
            raise InvalidConfigError(f"LoRA-SB forces alpha = r (scale 1), got alpha={self.alpha!r} with r={self.r}")

    tiny_fields: ClassVar[dict] = {"r": 2, "alpha": 2.0}
    variant_fields: ClassVar[list[dict]] = []


@register("lorasb", LoRASBConfig)
class LoRASB(LoRAXS):
    """LoRA-XS structure with LoRA-SB's settings; initial values from :class:`peftkit.init.LoRASB`."""

    config: LoRASBConfig  # narrows LoRAXS.config
    exempt: ClassVar[dict[str, str]] = {
        "identity_at_init": "spec (LoRA-SB): W is not reduced; the adapted model starts one approximate update "
        "step ahead (identity at init: no, by design)"
    }
