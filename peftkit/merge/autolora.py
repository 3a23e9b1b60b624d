"""AutoLoRA ("Automatic LoRA Retrieval and Fine-Grained Gated Fusion for Text-to-Image Generation"; no official
code was found: everything except the two-component structure is inferred).

1. **Retrieval by weight encoding** (:class:`LoRARetriever`): a LoRA is described by its weights alone, through a
   fixed *weight probe*: for every adapted layer ``l`` (in a fixed order), ``ΔW_l`` applied to ``m`` fixed random
   inputs ``P_l`` and sketched by a fixed random projection ``Q_l``: ``f_l = vec(Q_l ΔW_l P_l) / √(d_in)``
   (:func:`weight_probe`). Two learned heads map the concatenated ``f`` and a frozen text embedding of the caption
   to a shared space; trained with the symmetric InfoNCE loss (temperature ``τ = 0.07``) on matching (LoRA,
   caption) pairs. Retrieval = the top-``k`` cosine similarities between the prompt's and the LoRAs' embeddings.
2. **Fine-grained gated fusion** (:class:`GatedFusion`): a gate network maps a timestep (sinusoidal features) and a
   prompt embedding to gates ``g_{i,l} ∈ (0, 1)`` per retrieved LoRA ``i`` and layer ``l`` (sigmoid; the last
   layer starts at zero, so every gate starts at 0.5, a choice); each adapted layer computes
   ``y_l = W0_l x + Σ_i g_{i,l} (adapter_i(x) − W0_l x)`` (for LoRA: ``Σ_i g_{i,l} ΔW_{i,l} x``), per row when
   the gates are per row (:func:`gated`). Trained with base and LoRAs frozen (:meth:`GatedFusion.fit`, any loss:
   the diffusion loss, or matching a target denoiser).

The gated forward runs the model with its adapters disabled and adds the gated changes in forward hooks on the
adapted layers (each adapter's own ``forward``, so any method without ``uses_context`` works). Not mergeable (the
gates depend on the timestep and the prompt); for one prompt and one timestep it equals the merge
``Σ_i g_{i,l} ΔW_{i,l}``. Gates all 0 give the base model; one LoRA with gates 1 gives that LoRA.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from peftkit.core.model import AdaptedModel

from .errors import MergeError, MergeOptionError

__all__ = ["GatedFusion", "LoRARetriever", "gated", "layer_paths", "timestep_features", "weight_probe"]


def layer_paths(model: AdaptedModel, names: Sequence[str]) -> list[str]:
    """The modules any of ``names`` adapts, in model order (the gates' layer axis)."""
    wanted = {p for n in names for p in model.adapter_modules(n)}
    return [path for path, _ in model.get_base_model().named_modules() if path in wanted]


def weight_probe(
    model: AdaptedModel, name: str, paths: Sequence[str], probes: int = 4, sketch: int = 8, seed: int = 0
) -> Tensor:
    """The fixed weight-probe features of adapter ``name`` on ``paths`` (see the module docstring): ``[len(paths) ·
    sketch · probes]``, zeros for a layer it does not adapt. The probes ``P_l``, ``Q_l`` depend only on ``seed`` and
    the layer's shape.

    Raises:
        MergeError: an adapter without a weight-space update on one of its layers.
    """
    feats = []
    modules = model.adapter_modules(name)
    for i, path in enumerate(paths):
        base = model.base_view(path)
        if path not in modules:
            feats.append(torch.zeros(sketch * probes))
            continue
        dw = modules[path].delta_weight(base)
        if dw is None:
            raise MergeError(f"{name!r} on {path!r} has no weight-space update to probe")
        dw = dw.detach().reshape(dw.shape[0], -1).float()
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        p = torch.randn(dw.shape[1], probes, generator=g)
        q = torch.randn(sketch, dw.shape[0], generator=g) / math.sqrt(dw.shape[0])
        feats.append((q @ dw @ p).reshape(-1) / math.sqrt(dw.shape[1]))
    return torch.cat(feats)


class LoRARetriever(nn.Module):
    """Weight encoder + text head, contrastively aligned (see the module docstring)."""

    def __init__(self, weight_dim: int, text_dim: int, dim: int = 64, hidden: int = 128, tau: float = 0.07) -> None:
        super().__init__()
        self.tau = tau
        self.weights = nn.Sequential(nn.Linear(weight_dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.text = nn.Linear(text_dim, dim)
        self.register_buffer("scale", torch.ones(()))

    def encode_weights(self, feats: Tensor) -> Tensor:
        return F.normalize(self.weights(feats / self.scale), dim=-1)

    def encode_text(self, text: Tensor) -> Tensor:
        return F.normalize(self.text(text.float()), dim=-1)

    def loss(self, feats: Tensor, text: Tensor) -> Tensor:
        """The symmetric InfoNCE loss of matching rows."""
        logits = self.encode_text(text) @ self.encode_weights(feats).T / self.tau
        labels = torch.arange(len(logits))
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))

    @classmethod
    def fit(
        cls,
        feats: Tensor,
        text: Tensor,
        *,
        dim: int = 64,
        hidden: int = 128,
        tau: float = 0.07,
        steps: int = 300,
        lr: float = 3e-3,
        seed: int = 0,
    ) -> LoRARetriever:
        """Train on pairs (row ``i`` of ``feats``, :func:`weight_probe` of a LoRA, matches row ``i`` of ``text``).

        Raises:
            MergeOptionError: row counts that differ or fewer than 2 pairs, ``steps < 1``, ``τ <= 0``.
        """
        if feats.dim() != 2 or text.dim() != 2 or len(feats) != len(text) or len(feats) < 2:
            raise MergeOptionError(f"need >= 2 matching rows, got {tuple(feats.shape)} and {tuple(text.shape)}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or not tau > 0:
            raise MergeOptionError(f"steps must be a positive int and tau positive, got {steps!r}, {tau!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(feats.shape[1], text.shape[1], dim, hidden, tau)
            model.scale.fill_(float(feats.std()) or 1.0)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            for _ in range(steps):
                opt.zero_grad()
                model.loss(feats, text).backward()
                opt.step()
        return model.eval()

    @torch.no_grad()
    def retrieve(self, prompt: Tensor, feats: Tensor, k: int = 3) -> tuple[Tensor, Tensor]:
        """``(indices, similarities)`` of the top-``k`` LoRAs (rows of ``feats``) for one prompt embedding."""
        if not 1 <= k <= len(feats):
            raise MergeOptionError(f"k must be in [1, {len(feats)}], got {k}")
        sims = self.encode_weights(feats) @ self.encode_text(prompt)
        top = sims.topk(k)
        return top.indices, top.values


def timestep_features(t: Tensor, dim: int = 16, max_period: float = 1000.0) -> Tensor:
    """Sinusoidal features ``[B, dim]`` of timesteps ``t`` ``[B]``."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], -1)


@contextlib.contextmanager
def gated(model: AdaptedModel, names: Sequence[str], paths: Sequence[str], gates: Tensor) -> Iterator[None]:
    """Inside the block the model computes ``W0 x + Σ_i g_{i,l} (adapter_i(x) − W0 x)`` on every layer ``paths[l]``
    (``gates`` ``[k, L]``, or ``[B, k, L]`` per batch row), with gradients to ``gates``.

    Raises:
        MergeOptionError: gates of the wrong shape.
        MergeError: an adapter merged into the weights, or one that needs the forward context.
    """
    k, n_layers = len(names), len(paths)
    if gates.shape[-2:] != (k, n_layers) or gates.dim() not in (2, 3):
        raise MergeOptionError(f"gates must be [k={k}, L={n_layers}] or [B, k, L], got {tuple(gates.shape)}")
    hooks = []
    for l_index, path in enumerate(paths):
        layer = model.adapted_layer(path)
        adapters = [(i, layer.adapters[n]) for i, n in enumerate(names) if n in layer.adapters]
        for i, adapter in adapters:
            if names[i] in layer.merged or adapter.uses_context:
                raise MergeError(f"{names[i]!r} on {path!r} is merged or needs the forward context: cannot gate it")

        def hook(
            module: nn.Module, args: tuple, out: Tensor, l_index: int = l_index, adapters: list = adapters
        ) -> Tensor:
            total = out
            for i, adapter in adapters:
                g = gates[i, l_index] if gates.dim() == 2 else gates[:, i, l_index]
                if g.dim() == 1:  # per row: broadcast over the output's other dims
                    g = g.reshape(-1, *[1] * (out.dim() - 1))
                total = total + g * (adapter(args[0], out, module.base) - out)
            return total

        hooks.append(layer.register_forward_hook(hook))
    try:
        with model.adapters_disabled():
            yield
    finally:
        for h in hooks:
            h.remove()


class GatedFusion(nn.Module):
    """The gate network: ``[timestep features, prompt embedding] → MLP → sigmoid`` gates ``[B, k, L]`` for ``k``
    LoRAs on the layers ``paths`` (see the module docstring)."""

    def __init__(self, names: Sequence[str], paths: Sequence[str], prompt_dim: int, hidden: int = 64, t_dim: int = 16):
        super().__init__()
        self.names, self.paths, self.t_dim = list(names), list(paths), t_dim
        out = len(names) * len(paths)
        self.net = nn.Sequential(nn.Linear(t_dim + prompt_dim, hidden), nn.SiLU(), nn.Linear(hidden, out))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    @classmethod
    def for_model(cls, model: AdaptedModel, names: Sequence[str], prompt_dim: int, hidden: int = 64) -> GatedFusion:
        for n in names:
            model.require(n)
        return cls(names, layer_paths(model, names), prompt_dim, hidden)

    def forward(self, t: Tensor, prompt: Tensor) -> Tensor:
        h = torch.cat([timestep_features(t, self.t_dim), prompt.float()], -1)
        return torch.sigmoid(self.net(h)).reshape(-1, len(self.names), len(self.paths))

    def run(self, model: AdaptedModel, t: Tensor, prompt: Tensor, call: Callable[[], Any]) -> Any:
        """``call()`` (a forward of ``model``) with the gates of ``(t, prompt)`` (one row per batch row)."""
        with gated(model, self.names, self.paths, self(t, prompt)):
            return call()

    def fit(
        self,
        model: AdaptedModel,
        batches: Iterable[Any],
        loss_fn: Callable[[AdaptedModel, Any, GatedFusion], Tensor],
        *,
        steps: int = 100,
        lr: float = 3e-3,
        seed: int = 0,
    ) -> list[float]:
        """Train the gates only (model and LoRAs frozen: only this module's parameters are stepped), cycling over
        ``batches``; ``loss_fn(model, batch, self)`` runs the gated model (:meth:`run`). Returns the losses."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise MergeOptionError(f"steps must be a positive int, got {steps!r}")
        batches = list(batches)
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        losses = []
        frozen = [(p, p.requires_grad) for p in model.parameters()]  # no gradients into the base or the LoRAs
        for p, _ in frozen:
            p.requires_grad_(False)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for step in range(steps):
                    opt.zero_grad()
                    loss = loss_fn(model, batches[step % len(batches)], self)
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
        return losses
