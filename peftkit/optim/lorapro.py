"""LoRA-Pro (Wang & Liang, 2025, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", ICLR; official code:
mrflogs/LoRA-Pro, inside a patched DeepSpeed ZeRO step).

LoRA's factors are updated so that the change of ``W = W₀ + s·B·A`` follows full fine-tuning as closely as the
low-rank form allows. Per LoRA layer (``A [r, in]``, ``B [out, r]``, ``s``), with ``gA``, ``gB`` the gradients and
``δ = 1e-8``, ``(AAᵀ)⁻ = pinv(AAᵀ + δI)``, ``(BᵀB)⁻ = pinv(BᵀB + δI)``, ``P = I − B (BᵀB)⁻ Bᵀ``:

1. the equivalent gradient of ``W``: ``g̃ = s·B·g̃A + s·g̃B·A`` with ``g̃A = (BᵀB)⁻ gA / s²`` and
   ``g̃B = P gB (AAᵀ)⁻ / s²`` (the projection of the full gradient onto the tangent space ``{B·Y + Z·A}``);
2. full-size Adam on ``g̃`` (``M, V`` of shape ``[out, in]``; ``t`` from 1):
   ``G = (M / (1 − β1ᵗ)) / (√(V / (1 − β2ᵗ)) + eps)``;
3. ``G`` mapped back: ``gA' = s·BᵀG``, ``gB' = s·G·Aᵀ``, and the adjusted gradients
   ``ĝA = (BᵀB)⁻ gA' / s² + X·A``, ``ĝB = P gB' (AAᵀ)⁻ / s² − B·X`` with ``X`` solving the Sylvester equation
   ``(BᵀB) X + X (AAᵀ) = −(BᵀB)⁻ gA' Aᵀ / s²`` (the ``X`` that keeps ``ĝ`` closest to ``(gA', gB')``; the
   equivalent update ``s·B·ĝA + s·ĝB·A`` does not depend on it);
4. ``A ← A − lr·ĝA``, ``B ← B − lr·ĝB`` (decoupled weight decay ``p ← p·(1 − lr·wd)`` before, as AdamW).

Pairs are matched by module (the adapter's low-rank form), not by position in a flat list as the official code
does. The Sylvester equation is solved in float64 in the eigenbases of the two symmetric ``r × r`` matrices (the
official solver eigen-decomposes them too; a pair of zero eigenvalues gives the minimum-norm 0). Memory: the full
moments cost ``2·out·in`` elements per layer (as much as Adam in full fine-tuning); what LoRA-Pro saves against
full fine-tuning is the weight gradient. Parameters that are not LoRA pairs (a task head) get plain AdamW.

``full_adam=False`` (a cheaper variant the paper does not evaluate; *inferred*): steps 1 and 3 are applied to
the raw gradients (``ĝ`` from the equivalent gradient ``g̃`` itself) and ``A``, ``B`` take ordinary Adam steps on
``ĝA``, ``ĝB``, with moments of LoRA's size (``2·r·(in + out)`` elements per layer instead of ``2·out·in``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from peftkit.optim.errors import NoLowRankPairsError
from peftkit.optim.params import lowrank_pairs, trainable

DELTA = 1e-8


def solve_sylvester(p: Tensor, q: Tensor, c: Tensor) -> Tensor:
    """``X`` with ``p X + X q = c`` for symmetric positive semi-definite ``p``, ``q`` (``r × r``), in float64: with
    ``p = U diag(λ) Uᵀ`` and ``q = V diag(μ) Vᵀ``, ``X = U [(Uᵀ c V)_ij / (λ_i + μ_j)] Vᵀ`` (0 where both are 0)."""
    lam, u = torch.linalg.eigh(p.double())
    mu, v = torch.linalg.eigh(q.double())
    denom = lam[:, None] + mu[None, :]
    inner = u.T @ c.double() @ v
    safe = denom.abs() > 1e-300
    inner = torch.where(safe, inner / torch.where(safe, denom, torch.ones_like(denom)), torch.zeros_like(inner))
    return (u @ inner @ v.T).to(c.dtype)


def equivalent_gradient(a: Tensor, b: Tensor, ga: Tensor, gb: Tensor, s: float) -> Tensor:
    """Step 1: ``s·B·g̃A + s·g̃B·A``, the tangent-space projection of the full gradient (see the module docstring)."""
    r = a.shape[0]
    eye = torch.eye(r, dtype=a.dtype, device=a.device)
    aa_inv = torch.linalg.pinv(a @ a.T + DELTA * eye)
    bb_inv = torch.linalg.pinv(b.T @ b + DELTA * eye)
    ga_t = bb_inv @ ga / s**2
    gb_t = (gb - b @ (bb_inv @ (b.T @ gb))) @ aa_inv / s**2
    return s * (b @ ga_t) + s * (gb_t @ a)


def adjusted_gradients(a: Tensor, b: Tensor, g: Tensor, s: float) -> tuple[Tensor, Tensor, Tensor]:
    """Step 3: ``(ĝA, ĝB, X)`` for a full-size update direction ``g`` ``[out, in]``."""
    r = a.shape[0]
    eye = torch.eye(r, dtype=a.dtype, device=a.device)
    aa, bb = a @ a.T, b.T @ b
    aa_inv = torch.linalg.pinv(aa + DELTA * eye)
    bb_inv = torch.linalg.pinv(bb + DELTA * eye)
    ga, gb = s * (b.T @ g), s * (g @ a.T)
    x = solve_sylvester(bb, aa, -(bb_inv @ ga @ a.T) / s**2)
    ha = bb_inv @ ga / s**2 + x @ a
    hb = (gb - b @ (bb_inv @ (b.T @ gb))) @ aa_inv / s**2 - b @ x
    return ha, hb, x


class LoRAPro(torch.optim.Optimizer):
    """LoRA-Pro over the low-rank pairs of ``model`` (and AdamW over its other trainable parameters).

    Args:
        model: an adapted model with LoRA-shaped adapters (:func:`peftkit.optim.params.lowrank_pairs`).
        lr, betas, eps, weight_decay: of the full-size Adam on the equivalent gradient (and of the plain AdamW group).
        full_adam: Adam moments of the full-size equivalent gradient (the paper's method, default) or, with
            ``False``, of the adjusted factor gradients (see the module docstring).

    Raises:
        NoLowRankPairsError: ``model`` has no trainable LoRA pair on a linear layer.
        NoTrainableParametersError: nothing to train.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        full_adam: bool = True,
    ) -> None:
        params = trainable(model)
        pairs = [p for p in lowrank_pairs(model) if p.kind == "linear"]
        if not pairs:
            raise NoLowRankPairsError(
                "LoRA-Pro adjusts LoRA factor pairs (A, B) of linear layers and this model has none trainable: "
                "adapt linear layers with LoRA (or a LoRA-shaped method), or choose another optimizer"
            )
        in_pairs = {id(t) for pair in pairs for t in (pair.down, pair.up)}
        groups: list[dict[str, Any]] = [{"params": [pair.down, pair.up], "scale": pair.scale} for pair in pairs]
        rest = [p for p in params if id(p) not in in_pairs]
        if rest:
            groups.append({"params": rest})
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.full_adam = full_adam

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if "scale" in group:
                self._pair_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _moments(self, state: dict[str, Any], g: Tensor, group: dict[str, Any]) -> Tensor:
        """Adam on ``g`` with moments in ``state``: the bias-corrected ``M̂ / (√V̂ + eps)``."""
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(g)
            state["exp_avg_sq"] = torch.zeros_like(g)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        t = state["step"]
        return (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + group["eps"])

    def _pair_step(self, group: dict[str, Any]) -> None:
        a, b = group["params"]
        if a.grad is None or b.grad is None:
            return
        s, lr, wd = group["scale"], group["lr"], group["weight_decay"]
        work = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
        af, bf = a.to(work), b.to(work)
        g_eq = equivalent_gradient(af, bf, a.grad.to(work), b.grad.to(work), s)
        if self.full_adam:
            direction = self._moments(self.state[a], g_eq, group)
            ha, hb, _ = adjusted_gradients(af, bf, direction, s)
        else:
            ga, gb, _ = adjusted_gradients(af, bf, g_eq, s)
            ha, hb = self._moments(self.state[a], ga, group), self._moments(self.state[b], gb, group)
        if wd:
            a.mul_(1 - lr * wd)
            b.mul_(1 - lr * wd)
        a.add_(ha.to(a.dtype), alpha=-lr)
        b.add_(hb.to(b.dtype), alpha=-lr)

    def _adamw_step(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            update = self._moments(self.state[p], p.grad, group)
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update.to(p.dtype), alpha=-group["lr"])

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (the full-size moments)."""
        return sum(
            v.numel() * v.element_size() for s in self.state.values() for v in s.values() if isinstance(v, Tensor)
        )


def lorapro(model: nn.Module, *, lr: float, **kwargs: Any) -> LoRAPro:
    """:class:`LoRAPro` over ``model`` (keyword form, as the other optimizer builders)."""
    return LoRAPro(model, lr=lr, **kwargs)
