"""SST's optimizer side (Zhao et al., 2024, "Sparse Spectral Training and Inference on Euclidean and Hyperbolic
Neural Networks"; *inferred*, the official repository was not retrievable): AdamW over the ``sst`` adapters with
the state handling of the paper's rounds.

The ``sst`` method (:mod:`peftkit.methods.sst`) trains ``σ`` and ``r`` sampled singular vectors ``U_s``, ``V_s``
per round; at a round boundary (its ``step`` hook, which the trainer calls after the optimizer step) it writes the
vectors back, re-orthogonalises ``U diag(σ) Vᵀ`` by an SVD and samples new vectors. The adapter does not own the
optimizer, so this optimizer does the rest: at its first step of a new round it resets the AdamW state of
``U_s`` and ``V_s`` (fresh vectors, fresh moments) and keeps ``σ``'s state, re-ordered as the SVD re-orders the
singular values (decision: by the descending order of ``|σ|`` before the re-SVD, the order the new SVD lists
them in when the round's changes are small). Other trainable parameters take plain AdamW steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from peftkit.methods.sst import SST
from peftkit.optim.errors import OptimizerError
from peftkit.optim.params import trainable


class SSTAdamW(torch.optim.AdamW):
    """AdamW that follows the rounds of ``model``'s SST adapters (see the module docstring).

    Raises:
        OptimizerError: ``model`` has no trainable SST adapter.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        params = trainable(model)
        self.adapters = [m for m in model.modules() if isinstance(m, SST) and m.sigma.requires_grad]
        if not self.adapters:
            raise OptimizerError(
                "the SST optimizer follows the rounds of 'sst' adapters and this model has none active: adapt it "
                "with method 'sst' (peftkit train --method sst), or choose another optimizer"
            )
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        # What the optimizer knows of the rounds lives in its state_dict, so a checkpoint resumes it: the round
        # each adapter was at (first param group, plain ints) and sigma's order after the last step (sigma's state)
        self.param_groups[0]["sst_rounds"] = [a.round for a in self.adapters]
        self.resets = 0  # rounds whose vector states were reset (for tests and logs)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for adapter, seen in zip(self.adapters, self.param_groups[0]["sst_rounds"]):
            if adapter.round != seen:
                order = self.state.get(adapter.sigma, {}).get("sst_order")
                self._new_round(adapter, None if order is None else order.long())
        self.param_groups[0]["sst_rounds"] = [a.round for a in self.adapters]
        loss = super().step(closure)
        for adapter in self.adapters:
            self.state[adapter.sigma]["sst_order"] = adapter.sigma.detach().abs().argsort(descending=True)
        return loss

    def _new_round(self, adapter: SST, order: Tensor | None) -> None:
        for p in (adapter.U_s, adapter.V_s):
            self.state.pop(p, None)
        state = self.state.get(adapter.sigma)
        if state and order is not None:
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key][order].clone()
        self.resets += 1


def sst(model: nn.Module, *, lr: float, **kwargs: Any) -> SSTAdamW:
    """:class:`SSTAdamW` over ``model``."""
    return SSTAdamW(model, lr=lr, **kwargs)
