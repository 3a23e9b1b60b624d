"""Data-aware initialisers: set an adapter's initial values from the base weights or calibration data.

    model = pk.adapt(base, pk.LoRAConfig(r=8, targets="all-linear"), init="pissa")
    model = pk.adapt(base, pk.LoRAConfig(r=8), init=pk.init.LoRAGA(batches))
    model.add_adapter("forget", pk.LoRAConfig(r=8), init=pk.init.LoKU(forget_batches, retain_batches))
    model = pk.adapt(base, pk.get_config("lorasb", r=8, alpha=8), init=pk.init.LoRASB(batches, total_steps=1000))

An initialiser is any object with the two methods of :class:`Initializer`: ``prepare(config)`` returns the
config the adapter is built with (residual inits record their name in ``LoRAConfig.init``, so a saved adapter
reloads with its residual offset buffers) and ``apply(model, name)`` writes the initial values once the adapter
exists. Residual inits (PiSSA, LoRA-GA, LoKU) never modify the base weights: see :mod:`peftkit.methods.lora`.
SHiRA's calibrated masks (SHiRA-Grad / SHiRA-SNIP) choose which weights train. Papers: PiSSA (Meng et al.,
2024), LoRA-GA (Wang et al., 2024), LoKU/FILA (Cha et al., 2025), LoRA-SB (Ponkshe et al., 2024), SHiRA
(Bhardwaj et al., 2024).
"""

from __future__ import annotations

from peftkit.core.protocol import Initializer
from peftkit.core.registry import initializer
from peftkit.init.loku import LoKU, fila_factors, inverted_hinge_loss
from peftkit.init.lora_ga import LoRAGA, lora_ga_factors
from peftkit.init.lorasb import LoRASB, lorasb_factors
from peftkit.init.pissa import PiSSA, residual_config
from peftkit.init.shira import SHiRAGradientMask, shira_gradient_masks

as_initializer = initializer  # what ``init=`` accepts: an object, or a registered name ("pissa", ...)

__all__ = [
    "Initializer",
    "LoKU",
    "LoRAGA",
    "LoRASB",
    "PiSSA",
    "SHiRAGradientMask",
    "as_initializer",
    "fila_factors",
    "inverted_hinge_loss",
    "lora_ga_factors",
    "lorasb_factors",
    "residual_config",
    "shira_gradient_masks",
]
