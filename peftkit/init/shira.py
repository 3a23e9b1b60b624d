"""SHiRA-Grad / SHiRA-SNIP masks from calibration data (Bhardwaj et al., 2024, "Sparse High Rank Adapters").

The ``n`` trainable entries of each layer are the ``n`` largest ``|G|`` (SHiRA-Grad) or ``|W ⊙ G|``
(SHiRA-SNIP), ``G = ∇_W Σ_batches loss`` the gradient of the summed calibration loss of the **base** model
(adapters disabled; *inferred*: the paper says "top-|grad| entries on calibration data" without fixing the
accumulation). The gradient pass is the one the data-aware initialisers share
(:func:`peftkit.init._calibration.per_batch_gradients`); the mask math (scores, top-``n`` selection, how a mask
is stored) is the method's, in :mod:`peftkit.methods.shira`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor

from peftkit.core.config import AdapterConfig
from peftkit.core.errors import InvalidConfigError
from peftkit.core.model import AdaptedModel
from peftkit.init._calibration import per_batch_gradients
from peftkit.methods.shira import GRADIENT_SCORES, SHiRA, SHiRAConfig, top_mask


def shira_gradient_masks(
    model: AdaptedModel,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    adapter: str | None = None,
) -> dict[str, Tensor]:
    """Choose the entries of every gradient-based SHiRA mask (``mask_type="gradient"`` or ``"snip"``) of one
    adapter from calibration data: the ``n`` largest ``|G|`` (or ``|W ⊙ G|``), ``G`` the gradient of
    ``Σ_batches loss_fn(model, batch)`` with respect to each adapted base weight, taken on the base model
    (adapters disabled, training mode, the base weights unchanged and without ``.grad`` afterwards). The values
    restart at zero, so the model is still the base model. :class:`SHiRAGradientMask` runs this as an ``init=``.

    Args:
        model: the adapted model holding the SHiRA adapter.
        batches: calibration batches (any objects ``loss_fn`` understands).
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` (default: the output's ``loss``).
        adapter: the adapter to calibrate (default: the single active one).

    Returns:
        ``{module path: [2, n] indices}`` chosen for each module.

    Raises:
        InvalidConfigError: the adapter is not a gradient-based SHiRA adapter or no batch was given.
    """
    name = model.resolve(adapter)
    config = model.configs[name]
    if not isinstance(config, SHiRAConfig) or config.mask_type not in GRADIENT_SCORES:
        raise InvalidConfigError(
            f"adapter {name!r} is not a SHiRA adapter with mask_type in {sorted(GRADIENT_SCORES)}: nothing to calibrate"
        )
    totals: dict[str, Tensor] = {}
    for _, grads in per_batch_gradients(model, name, batches, loss_fn, desc="SHiRA gradient mask"):
        for path, g in grads.items():
            totals[path] = totals[path] + g if path in totals else g
    if not totals:
        raise InvalidConfigError("shira_gradient_masks needs at least one calibration batch")
    chosen = {}
    for path, a in model.adapter_modules(name).items():
        if not isinstance(a, SHiRA):
            continue  # modules_to_save heads
        score = GRADIENT_SCORES[config.mask_type](model.base_view(path).weight.detach().float(), totals[path])
        a.set_mask(top_mask(score, a.values.numel()).to(a.indices.device))
        chosen[path] = a.indices
    return chosen


class SHiRAGradientMask:
    """The SHiRA-Grad / SHiRA-SNIP mask as a data-aware initialiser (the :class:`peftkit.init.Initializer`
    protocol): ``pk.adapt(base, SHiRAConfig(r=32), init=SHiRAGradientMask(batches))``.

    Args:
        batches: calibration batches.
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` (default: the output's ``loss``).
        score: ``"gradient"`` (top ``|∇W|``) or ``"snip"`` (top ``|W ⊙ ∇W|``); recorded as the config's
            ``mask_type``.
    """

    def __init__(
        self, batches: Iterable[Any], loss_fn: Callable[[Any, Any], Tensor] | None = None, score: str = "gradient"
    ) -> None:
        if score not in GRADIENT_SCORES:
            raise InvalidConfigError(f"score must be one of {sorted(GRADIENT_SCORES)}, got {score!r}")
        self.batches, self.loss_fn, self.score = batches, loss_fn, score

    def prepare(self, config: AdapterConfig) -> AdapterConfig:
        if not isinstance(config, SHiRAConfig):
            raise InvalidConfigError(f"SHiRAGradientMask initialises a SHiRA adapter; got a {type(config).__name__}")
        return config.replace(mask_type=self.score)

    def apply(self, model: AdaptedModel, name: str) -> None:
        shira_gradient_masks(model, self.batches, self.loss_fn, adapter=name)
