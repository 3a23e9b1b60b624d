"""SHiRA: Sparse High Rank Adapters (Bhardwaj et al., 2024, "Sparse High Rank Adapters"), as in Hugging Face
PEFT's ``ShiraConfig`` (PEFT's implementation is by the authors).

A fixed sparse mask ``M ∈ {0,1}^{d_out×d_in}`` with ``n = r·(d_in + d_out)`` ones (LoRA-r's parameter count)
selects the trainable entries of ``W``: ``W_eff = W + S``, ``S = scatter(indices, s · values)``, and
``y = x W_effᵀ + b`` is computed as one base op on the weight merged on the fly (``O(n)`` scatter into a copy
of ``W``, then the usual ``O(tokens · d_in · d_out)`` product), as the spec asks. ``ΔW = S`` is exact and can
have rank far above ``r``.

Masks (``mask_type``):

* ``"random"`` (PEFT default): ``idx = randperm(d_out·d_in, generator=g)[:n]``, ``g`` seeded by
  ``random_seed``; the ones are stored in row-major sorted ``(row, col)`` order (``torch.where(M == 1)``), so
  ``values[i]`` belongs to the i-th one in that order, exactly as PEFT.
* ``"magnitude"`` (SHiRA-WM, paper variant): the ``n`` entries of largest ``|W|`` (ties broken by
  ``torch.topk``).
* ``"gradient"`` (SHiRA-Grad) and ``"snip"`` (SHiRA-SNIP), paper variants that need calibration data: the ``n``
  entries of largest ``|G|`` or ``|W ⊙ G|``, ``G = ∇_W Σ_batches loss`` the gradient of the summed calibration
  loss of the **base** model (adapters disabled; *inferred*: the paper says "top-|grad| entries on calibration
  data" without fixing the accumulation). Pass ``init=SHiRAGradientMask(batches)`` to ``pk.adapt`` /
  ``add_adapter`` (a :mod:`peftkit.init` initialiser), or build the adapter and call
  :func:`shira_gradient_masks`; until then the adapter refuses to run (:class:`MaskNotCalibratedError`) instead
  of silently training a placeholder mask. The chosen indices are saved, so :func:`peftkit.load` restores them.

Custom masks (PEFT's ``mask_fn``): :meth:`SHiRA.set_mask` with any ``{0,1}`` mask of exactly ``n`` ones.

Every mask is stored as ``indices [2, n]`` + ``values [n]`` (the only saved tensors), so applying or switching
an adapter is a scatter of ``n`` values (``index_put``), never a low-rank product to fuse: the unmerged forward
scatters into a copy of ``W``; :meth:`SHiRA.delta_weight` is one scatter into zeros, which the core's merge then
adds densely (``O(d_out·d_in)``, the same add as any method's merge).

Decisions: the indices are a persistent ``int32`` buffer ``indices [2, n]`` (spec decision: PEFT keeps them
in a plain dict; saving them makes a reload exact whatever the seed). *Inferred*: with ``random_seed=None``
the generator is seeded by the config's ``seed`` if set, else left at ``torch.Generator()``'s fixed default
seed (PEFT's behaviour, so the mask is still deterministic). Scaling ``s = scale`` (default 1.0, PEFT's
``set_scale``). Init ``values = 0`` → identity; ``init="randn"`` (PEFT ``init_weights=False``) for tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from peftkit.core.base import BaseView
from peftkit.core.errors import InvalidConfigError, PeftkitError
from peftkit.core.model import AdaptedModel
from peftkit.core.protocol import Adapter, AdapterConfig, SparseDelta, require_positive_int
from peftkit.core.registry import register

MASK_TYPES = ("random", "magnitude", "gradient", "snip")
#: mask types whose entries come from calibration gradients, and their score from (W, G)
GRADIENT_SCORES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "gradient": lambda weight, grad: grad.abs(),
    "snip": lambda weight, grad: (weight * grad).abs(),
}


class MaskNotCalibratedError(PeftkitError, RuntimeError):
    """A gradient-based SHiRA mask was used before :func:`shira_gradient_masks` chose its entries."""


@dataclass(kw_only=True)
class SHiRAConfig(AdapterConfig):
    """Settings of SHiRA (PEFT ``ShiraConfig`` defaults).

    Attributes:
        r: sets the number of trainable entries per layer, ``n = r·(d_in + d_out)`` (not a rank limit).
        mask_type: ``"random"`` (PEFT), ``"magnitude"`` (SHiRA-WM: top-``n`` ``|W|``), ``"gradient"``
            (SHiRA-Grad: top-``n`` ``|∇W|``) or ``"snip"`` (SHiRA-SNIP: top-``n`` ``|W ⊙ ∇W|``); the last two are
            set by :func:`shira_gradient_masks` from calibration batches.
        random_seed: seed of the random mask (see the module docstring for ``None``).
        scale: multiplies the sparse update (PEFT's ``scaling``, 1.0 in training).
        init: ``"zeros"`` (identity at init) or ``"randn"`` (PEFT ``init_weights=False``; tests).
    """

    r: int = 32
    mask_type: Literal["random", "magnitude", "gradient", "snip"] = "random"
    random_seed: int | None = None
    scale: float = 1.0
    init: Literal["zeros", "randn"] = "zeros"

    def validate(self) -> None:
        require_positive_int("r", self.r)
        if self.mask_type not in MASK_TYPES:
            raise InvalidConfigError(f"mask_type must be one of {MASK_TYPES}, got {self.mask_type!r}")
        if self.init not in ("zeros", "randn"):
            raise InvalidConfigError(f"init must be 'zeros' or 'randn', got {self.init!r}")

    @classmethod
    def tiny(cls) -> SHiRAConfig:
        return cls(r=1)

    @classmethod
    def tiny_variants(cls) -> list[AdapterConfig]:
        t = cls.tiny()
        return [t, t.replace(mask_type="magnitude", scale=2.0), t.replace(random_seed=5)]


def random_mask(d_out: int, d_in: int, n: int, seed: int | None) -> Tensor:
    """PEFT's random mask: ``n`` ones at ``randperm(d_out·d_in)[:n]`` of a CPU generator seeded by ``seed``."""
    g = torch.Generator()
    if seed is not None:
        g.manual_seed(seed)
    idx = torch.randperm(d_out * d_in, generator=g)[:n]
    mask = torch.zeros(d_out * d_in, dtype=torch.bool)
    mask[idx] = True
    return mask.view(d_out, d_in)


def top_mask(score: Tensor, n: int) -> Tensor:
    """Ones at the ``n`` largest entries of ``score`` (ties broken by ``torch.topk``)."""
    idx = score.detach().flatten().float().topk(n).indices.cpu()
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    mask[idx] = True
    return mask.view(score.shape)


def magnitude_mask(weight: Tensor, n: int) -> Tensor:
    """SHiRA-WM: ones at the ``n`` largest ``|W|`` entries."""
    return top_mask(weight.abs(), n)


def _mask_indices(mask: Tensor) -> Tensor:
    """``[2, n]`` int32 (row, col) of the ones, row-major sorted (``torch.where``), as PEFT stores them."""
    rows, cols = torch.where(mask)
    return torch.stack([rows, cols]).to(torch.int32)


@register("shira", SHiRAConfig)
class SHiRA(Adapter):
    """``y = x (W + scatter(indices, s·values))ᵀ + b``; see the module docstring."""

    config: SHiRAConfig

    def __init__(self, base: BaseView, config: SHiRAConfig) -> None:
        super().__init__(base, config)
        d_out, d_in = base.out_features, base.in_features
        n = config.r * (d_in + d_out)
        if n > d_in * d_out:
            raise InvalidConfigError(
                f"r={config.r} gives n = r·(d_in + d_out) = {n} trainable entries, more than the {d_in * d_out} "
                f"weights of this layer {tuple(base.weight_shape)}"
            )
        if config.mask_type == "magnitude":
            mask = magnitude_mask(base.weight, n)
        else:  # random, and the placeholder of a gradient mask until shira_gradient_masks sets it
            mask = random_mask(d_out, d_in, n, config.random_seed if config.random_seed is not None else config.seed)
        self.register_buffer("indices", _mask_indices(mask).to(base.device))
        self.values = nn.Parameter(torch.empty(n, device=base.device))
        self.weight_shape = torch.Size(base.weight_shape)
        # Loading skips reset_parameters: a loaded gradient mask is the saved, calibrated one.
        self.needs_calibration = False

    def reset_parameters(self, base: BaseView) -> None:
        self.needs_calibration = self.config.mask_type in GRADIENT_SCORES
        if self.config.init == "randn":
            self.values.normal_()
        else:
            self.values.zero_()

    def set_mask(self, mask: Tensor) -> None:
        """Use the ``n`` ones of ``mask`` (canonical ``[out, in]``) as the trainable entries; values restart at 0."""
        if mask.shape != self.weight_shape or int(mask.sum()) != self.values.numel():
            raise InvalidConfigError(
                f"a SHiRA mask must be {tuple(self.weight_shape)} with exactly {self.values.numel()} "
                f"ones, got {tuple(mask.shape)} with {int(mask.sum())}"
            )
        with torch.no_grad():
            self.indices.copy_(_mask_indices(mask.bool()))
            self.values.zero_()
        self.needs_calibration = False

    def _index(self) -> tuple[Tensor, Tensor]:
        if self.needs_calibration:
            raise MaskNotCalibratedError(
                f"this SHiRA adapter has mask_type={self.config.mask_type!r}: build it with "
                "init=SHiRAGradientMask(batches) or call shira_gradient_masks(model, batches, loss_fn) first"
            )
        idx = self.indices.long()
        return idx[0], idx[1]

    def delta_weight(self, base: BaseView) -> Tensor:
        delta = torch.zeros(base.weight_shape, dtype=self.values.dtype, device=self.values.device)
        return delta.index_put(self._index(), self.config.scale * self.values)

    def sparse_delta(self, base: BaseView) -> SparseDelta:
        """Merging writes only the ``n`` masked entries (the paper's fast adapter switch)."""
        return SparseDelta(self._index(), self.config.scale * self.values)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        vals = (self.config.scale * self.values).to(base.weight.dtype)
        weight = base.weight.index_put(self._index(), vals, accumulate=True)
        return base.apply(x, weight, base.bias)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: SHiRAConfig) -> int:
        return config.r * (base.in_features + base.out_features)


def shira_gradient_masks(
    model: AdaptedModel,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    adapter: str | None = None,
) -> dict[str, Tensor]:
    """Choose the entries of every gradient-based SHiRA mask (``mask_type="gradient"`` or ``"snip"``) of one
    adapter from calibration data: the ``n`` largest ``|G|`` (or ``|W ⊙ G|``), ``G`` the gradient of
    ``Σ_batches loss_fn(model, batch)`` with respect to each adapted base weight, taken on the base model by the
    gradient pass the data-aware initialisers share (:func:`peftkit.init._calibration.per_batch_gradients`:
    adapters disabled, training mode, the base weights unchanged and without ``.grad`` afterwards). The values
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
    from peftkit.init._calibration import per_batch_gradients  # peftkit.init imports the methods

    name = adapter or model._single_active()
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
        view = model.model.get_submodule(path).base
        score = GRADIENT_SCORES[config.mask_type](view.weight.detach().float(), totals[path])
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
