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
  data" without fixing the accumulation). Pass ``init=pk.init.SHiRAGradientMask(batches)`` to ``pk.adapt`` /
  ``add_adapter``, or build the adapter and call :func:`peftkit.init.shira_gradient_masks` (the calibration
  pass lives in :mod:`peftkit.init.shira`, with the other data-aware initialisers); until then the adapter
  refuses to run (:class:`MaskNotCalibratedError`) instead of silently training a placeholder mask. The chosen
  indices are saved, so :func:`peftkit.load` restores them.

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from peftkit.core.api import (
    Adapter,
    AdapterConfig,
    BaseView,
    InvalidConfigError,
    PeftkitError,
    PositiveInt,
    SparseDelta,
    register,
)

#: mask types whose entries come from calibration gradients, and their score from (W, G)
GRADIENT_SCORES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "gradient": lambda weight, grad: grad.abs(),
    "snip": lambda weight, grad: (weight * grad).abs(),
}


class MaskNotCalibratedError(PeftkitError, RuntimeError):
    """A gradient-based SHiRA mask was used before :func:`peftkit.init.shira_gradient_masks` chose its entries."""


@dataclass(kw_only=True)
class SHiRAConfig(AdapterConfig):
    """Settings of SHiRA (PEFT ``ShiraConfig`` defaults).

    Attributes:
        r: sets the number of trainable entries per layer, ``n = r·(d_in + d_out)`` (not a rank limit).
        mask_type: ``"random"`` (PEFT), ``"magnitude"`` (SHiRA-WM: top-``n`` ``|W|``), ``"gradient"``
            (SHiRA-Grad: top-``n`` ``|∇W|``) or ``"snip"`` (SHiRA-SNIP: top-``n`` ``|W ⊙ ∇W|``); the last two are
            set by :func:`peftkit.init.shira_gradient_masks` from calibration batches.
        random_seed: seed of the random mask (see the module docstring for ``None``).
        scale: multiplies the sparse update (PEFT's ``scaling``, 1.0 in training).
        init: ``"zeros"`` (identity at init) or ``"randn"`` (PEFT ``init_weights=False``; tests).
    """

    r: PositiveInt = 32
    mask_type: Literal["random", "magnitude", "gradient", "snip"] = "random"
    random_seed: int | None = None
    scale: float = 1.0
    init: Literal["zeros", "randn"] = "zeros"

    tiny_fields: ClassVar[dict] = {"r": 1}
    variant_fields: ClassVar[list[dict]] = [{"mask_type": "magnitude", "scale": 2.0}, {"random_seed": 5}]


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
class SHiRA(Adapter[SHiRAConfig]):
    """``y = x (W + scatter(indices, s·values))ᵀ + b``; see the module docstring."""

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
                "init=pk.init.SHiRAGradientMask(batches) or call pk.init.shira_gradient_masks(model, batches, loss_fn) "
                "first"
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
