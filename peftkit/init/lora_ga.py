"""LoRA-GA (Wang et al., 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation").

The averaged full gradient ``G = mean_batches ∂L/∂W`` of every
target weight is estimated on a few calibration batches; ``U, S, V = svd_lowrank(G, q=min(4r, min(G.shape)),
niter=4)``, ``Vh = Vᵀ``; direction ``"ArB2r"`` (default): ``A = Vh[:r]``, ``B = U[:, r:2r]``; then the scale
(``"stable"``: both times ``d_out^{1/4}/√γ``). The residual offset ``B₀A₀ = BA`` keeps the model unchanged
at init (stored as a frozen offset, the base is not modified: see :mod:`peftkit.methods.lora`).

With ``direction="ArB2r"`` the first gradient step on ``A``, ``B`` moves ``W`` by ``−η·s²·rank_2r(G)`` up to
the scale factors: the first LoRA step approximates the full fine-tuning step.

``peft_compat=True`` reproduces PEFT's variant instead (spec: "PEFT differs from official"): ``B`` is
multiplied by the singular values of its columns, ``"stable"`` scales ``B`` only, ``"weightS"`` is PEFT's
``weight_svd`` (``B ·= σ_W[0]/S_B[0]``), ``"random"`` uses the same indices for ``A`` and ``B``.
Decision (inferred): singular pairs follow the spec's sign convention (largest-``|entry|`` of each left vector
positive) for deterministic factors; ``norm_clip`` (official option: "if ``max|s·BA| > max|W|``, rescale")
rescales ``A`` and ``B`` by the same factor ``√(max|W| / max|s·BA|)``, so ``max|s·BA| = max|W|`` (inferred).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from peftkit.core.config import AdapterConfig
from peftkit.core.errors import InvalidConfigError
from peftkit.init._calibration import LossFn, per_batch_gradients, seeded, target_layers
from peftkit.methods.lora import fix_signs

if TYPE_CHECKING:
    from peftkit.core.model import AdaptedModel

DIRECTIONS = ("ArB2r", "ArBr", "A2rBr", "random")
SCALES = ("stable", "gd", "unit", "weightS")


@torch.no_grad()
def lora_ga_factors(
    grad: Tensor,
    r: int,
    scale: float,
    *,
    direction: str = "ArB2r",
    scale_mode: str = "stable",
    gamma: float = 16.0,
    weight: Tensor | None = None,
    peft_compat: bool = False,
    norm_clip: bool = False,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """LoRA-GA's ``A [r, in]``, ``B [out, r]`` for one layer from its averaged gradient ``grad [out, in]``.

    Args:
        grad: the averaged gradient of the layer's weight (float32).
        r: rank; at most ``min(G.shape) / 2`` (the directions use the first ``2r`` singular pairs).
        scale: the LoRA scale ``s``.
        direction: ``"ArB2r"``, ``"ArBr"``, ``"A2rBr"`` or ``"random"`` (spec).
        scale_mode: ``"stable"`` (``× d_out^{1/4}/√γ``), ``"gd"`` (``/ s``), ``"unit"`` or ``"weightS"``.
        gamma: ``γ`` of the stable scale (spec default 16).
        weight: the layer's weight (needed by ``"weightS"``).
        peft_compat: PEFT's variant (see the module docstring).
        norm_clip: rescale so that ``max|s·BA| <= max|W|`` (needs ``weight``).
        seed: seed of the randomised SVD (and of ``"random"``'s split).
    """
    g = grad.detach().float()
    if 2 * r > min(g.shape):
        raise InvalidConfigError(f"LoRA-GA needs 2r <= min(out, in): r={r} for a gradient of shape {tuple(g.shape)}")
    with seeded(seed, g.device):
        u, s, v = torch.svd_lowrank(g, q=min(4 * r, min(g.shape)), niter=4)
        u, vh = fix_signs(u[:, : 2 * r], v[:, : 2 * r].T)
        s = s[: 2 * r]
        perm = torch.randperm(2 * r, device=g.device) if direction == "random" else None
    if direction == "ArB2r":
        a_idx, b_idx = torch.arange(r), torch.arange(r, 2 * r)
    elif direction == "ArBr":
        a_idx, b_idx = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    elif direction == "A2rBr":
        a_idx, b_idx = torch.arange(r, 2 * r), torch.arange(r)
    elif direction == "random":
        assert perm is not None
        a_idx, b_idx = (perm[:r], perm[:r]) if peft_compat else (perm[:r], perm[r:])
    else:
        raise InvalidConfigError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    a, b = _scaled(vh[a_idx], u[:, b_idx], s, b_idx, r, scale, scale_mode, gamma, weight, peft_compat)
    if norm_clip:
        top, w_max = float((scale * b @ a).abs().max()), float(_weight(weight).abs().max())
        if top > w_max:
            a, b = a * (w_max / top) ** 0.5, b * (w_max / top) ** 0.5
    return a, b


def _scaled(
    a: Tensor,
    b: Tensor,
    s: Tensor,
    b_idx: Tensor,
    r: int,
    scale: float,
    scale_mode: str,
    gamma: float,
    weight: Tensor | None,
    peft_compat: bool,
) -> tuple[Tensor, Tensor]:
    """The scale step of LoRA-GA (official, or PEFT's with ``peft_compat``)."""
    d_out = b.shape[0]
    if peft_compat:
        s_b = s[b_idx]
        b = b * s_b
        if scale_mode == "stable":
            b = b * (d_out**0.25 / gamma**0.5)
        elif scale_mode == "weightS":
            w_s = torch.linalg.svdvals(_weight(weight).float())
            b = b * (w_s[0] / s_b[0]) if s_b[0] > 0 else b
        elif scale_mode == "gd":
            a, b = a / scale, b / scale
        elif scale_mode != "unit":
            raise InvalidConfigError(f"scale must be one of {SCALES}, got {scale_mode!r}")
        return a, b
    if scale_mode == "stable":
        factor = d_out**0.25 / gamma**0.5
        a, b = a * factor, b * factor
    elif scale_mode == "gd":
        a, b = a / scale, b / scale
    elif scale_mode == "weightS":
        w_s = torch.linalg.svdvals(_weight(weight).float())[:r]
        factor = float((w_s / scale).sqrt().mean())
        a, b = a * factor, b * factor
    elif scale_mode != "unit":
        raise InvalidConfigError(f"scale must be one of {SCALES}, got {scale_mode!r}")
    return a, b


def _weight(weight: Tensor | None) -> Tensor:
    if weight is None:
        raise InvalidConfigError("scale='weightS' and norm_clip need the layer's weight")
    return weight


class LoRAGA:
    """LoRA-GA initialiser: ``pk.adapt(model, pk.LoRAConfig(r=8), init=pk.init.LoRAGA(batches))``.

    Args:
        batches: calibration batches (official defaults: 64 batches of 2; reproduce config 8 of 1); each is
            passed to ``loss_fn``.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``.
        direction: ``"ArB2r"`` (default), ``"ArBr"``, ``"A2rBr"``, ``"random"``.
        scale: ``"stable"`` (default), ``"gd"``, ``"unit"``, ``"weightS"``.
        gamma: ``γ`` of the stable scale (default 16).
        peft_compat: PEFT's variant of the formulas (``LoraGAConfig``), for parity with PEFT.
        norm_clip: rescale each layer's factors so that ``max|s·BA| <= max|W|`` (official option, off).
        seed: seed of the randomised SVDs.
    """

    def __init__(
        self,
        batches: Iterable[Any],
        loss_fn: LossFn | None = None,
        direction: str = "ArB2r",
        scale: str = "stable",
        gamma: float = 16.0,
        peft_compat: bool = False,
        norm_clip: bool = False,
        seed: int = 0,
    ) -> None:
        if direction not in DIRECTIONS:
            raise InvalidConfigError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if scale not in SCALES:
            raise InvalidConfigError(f"scale must be one of {SCALES}, got {scale!r}")
        if not gamma > 0:
            raise InvalidConfigError(f"gamma must be positive, got {gamma!r}")
        self.batches, self.loss_fn = batches, loss_fn
        self.direction, self.scale, self.gamma, self.peft_compat, self.seed = direction, scale, gamma, peft_compat, seed
        self.norm_clip = norm_clip

    def prepare(self, config: AdapterConfig) -> AdapterConfig:
        from peftkit.init.pissa import residual_config

        return residual_config(config, "lora_ga")

    def gradients(self, model: AdaptedModel, name: str) -> dict[str, Tensor]:
        """``{module path: mean_batches ∂L/∂W}`` (float32, ``[out, fan_in]``)."""
        total: dict[str, Tensor] = {}
        count = 0
        for _, grads in per_batch_gradients(model, name, self.batches, self.loss_fn, "LoRA-GA gradients"):
            for path, g in grads.items():
                total[path] = total[path] + g if path in total else g
            count += 1
        if count == 0:
            raise InvalidConfigError("LoRA-GA got no calibration batches")
        return {path: g / count for path, g in total.items()}

    @torch.no_grad()
    def apply(self, model: AdaptedModel, name: str) -> None:
        grads = self.gradients(model, name)
        for path, (layer, adapter) in target_layers(model, name).items():
            a, b = lora_ga_factors(
                grads[path],
                adapter.config.r,
                adapter.scale,
                direction=self.direction,
                scale_mode=self.scale,
                gamma=self.gamma,
                weight=layer.base.weight.reshape(layer.base.out_features, -1),
                peft_compat=self.peft_compat,
                norm_clip=self.norm_clip,
                seed=self.seed,
            )
            adapter.set_factors(a, b)
