"""SG-LoRA (Li et al., "Semantic-guided LoRA Parameters Generation", CVPR 2026): generate a LoRA for an unseen task
from its text description, with a conditional VAE trained on a library of expert LoRAs and their descriptions.
The official code was not readable; every detail below except the pipeline's structure is inferred.

1. **Semantic guidance** (:func:`semantic_condition`): with the target description's embedding ``t*`` and the
   experts' ``t_e`` (any frozen text encoder; the benchmark uses MiniLM), ``s_e = cos(t*, t_e)``; the top-``k``
   experts get ``π_e = softmax(s_e / τ)`` (others 0); the condition is ``c = [t*, Σ_e π_e t_e]``.
2. **CVAE over LoRA parameters** (:class:`SGLoRA`): an expert's LoRA is one vector ``θ`` (every tensor the adapter
   saves, in its state-dict order: :class:`LoRALayout`), standardised by the library's mean of each value and one
   scalar std of the deviations from it (inferred: experts trained from one initialisation share most of their
   values, e.g. LoRA's barely moved ``A``, and with one scalar mean the decoder had to memorise that shared part
   first; on MiniLM r=8 q/v LoRAs it then reconstructed its own training experts with relative error 0.93),
   split into chunks of ``chunk`` values (the last zero-padded), each with a learned position
   embedding. The condition is centred on the experts' conditions and divided by one scalar std (inferred: real
   description embeddings share a large common part, e.g. MiniLM's of "Is this BBC news article about X?" for
   several X; uncentred, descriptions differing by 5 % of their common part left the CVAE generating the library
   mean for every one of them). Encoder ``q(z | θ_j, c, p_j)``, decoder ``θ̂_j = Dec(z, c, p_j)`` (two-layer MLPs).
   Trained on the experts, each conditioned on its own description's ``c`` (its ``π`` concentrates on itself), with
   ``‖θ − θ̂‖² + β KL(q ‖ N(0, I))``; ``noise`` adds Gaussian copies of the experts (augmentation).
3. **Generation** (:meth:`SGLoRA.generate`): ``z = 0`` (the prior's mean; deterministic) or ``z ~ N(0, I)``,
   decode every chunk with the target's condition, load the vector as an ordinary adapter (mergeable).

Defaults (inferred): ``top_k = 3``, ``τ = 0.1``, ``β = 1e-3``, latent 64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from peftkit.core.model import AdaptedModel

from .errors import MergeError, MergeOptionError

__all__ = ["LoRALayout", "SGLoRA", "fit_sglora", "semantic_condition"]


@dataclass(frozen=True)
class LoRALayout:
    """The tensors of one adapter (names and shapes, in state-dict order) as one flat vector."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, model: AdaptedModel, names: Sequence[str]) -> LoRALayout:
        """The common layout of adapters ``names``.

        Raises:
            MergeError: adapters whose saved tensors differ in names or shapes (naming the first difference).
        """
        layouts = []
        for n in names:
            state = model.adapter_state_dict(n)
            layouts.append(cls(tuple(state), tuple(tuple(t.shape) for t in state.values())))
        for n, layout in zip(names[1:], layouts[1:]):
            if layout != layouts[0]:
                diff = next(
                    (f"{k}: {s}" for k, s in zip(layout.keys, layout.shapes) if (k, s) not in layouts[0].items()),
                    "a different number of tensors",
                )
                raise MergeError(f"adapter {n!r} has other tensors than {names[0]!r} ({diff})")
        return layouts[0]

    def items(self) -> list[tuple[str, tuple[int, ...]]]:
        return list(zip(self.keys, self.shapes))

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def flatten(self, state: dict[str, Tensor]) -> Tensor:
        return torch.cat([state[k].detach().reshape(-1).float() for k in self.keys])

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        out, start = {}, 0
        for k, s in self.items():
            n = math.prod(s)
            out[k] = vector[start : start + n].reshape(s).clone()
            start += n
        return out


def semantic_condition(target: Tensor, experts: Tensor, top_k: int = 3, tau: float = 0.1) -> tuple[Tensor, Tensor]:
    """``(π, c)`` for a target embedding ``[d]`` against expert embeddings ``[E, d]`` (see the module docstring):
    ``π`` ``[E]`` (zero outside the top-``k`` cosine similarities, softmax at temperature ``τ`` inside) and
    ``c = [t*, Σ π_e t_e]`` ``[2d]``.

    Raises:
        MergeOptionError: mismatched dimensions, ``top_k`` outside ``[1, E]``, ``τ <= 0``, non-finite embeddings.
    """
    if experts.dim() != 2 or target.shape != experts.shape[1:]:
        raise MergeOptionError(
            f"need a target [d] and experts [E, d], got {tuple(target.shape)} and {tuple(experts.shape)}"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= experts.shape[0]:
        raise MergeOptionError(f"top_k must be an int in [1, {experts.shape[0]}], got {top_k!r}")
    if not (math.isfinite(tau) and tau > 0):
        raise MergeOptionError(f"tau must be positive, got {tau}")
    if not (torch.isfinite(target).all() and torch.isfinite(experts).all()):
        raise MergeOptionError("embeddings must be finite")
    sims = F.cosine_similarity(target[None].float(), experts.float(), dim=-1)
    top = sims.topk(top_k).indices
    pi = torch.zeros_like(sims)
    pi[top] = torch.softmax(sims[top] / tau, 0)
    return pi, torch.cat([target.float(), pi @ experts.float()])


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, d_out)
    )


class SGLoRA(nn.Module):
    """The CVAE of SG-LoRA with the expert library it was trained on (see the module docstring; build it with
    :func:`fit_sglora`)."""

    def __init__(
        self,
        layout: LoRALayout,
        experts: Tensor,
        *,
        chunk: int = 256,
        latent: int = 64,
        hidden: int = 256,
        top_k: int = 3,
        tau: float = 0.1,
    ) -> None:
        super().__init__()
        self.layout, self.chunk, self.latent, self.top_k, self.tau = layout, chunk, latent, top_k, tau
        self.n_chunks = -(-layout.size // chunk)
        cond = 2 * experts.shape[1]
        self.register_buffer("experts", experts.detach().float().clone())
        self.register_buffer("mean", torch.zeros(layout.size))
        self.register_buffer("std", torch.ones(()))
        self.register_buffer("cond_mean", torch.zeros(cond))
        self.register_buffer("cond_std", torch.ones(()))
        self.position = nn.Embedding(self.n_chunks, 32)
        self.encoder = _mlp(chunk + cond + 32, hidden, 2 * latent)
        self.decoder = _mlp(latent + cond + 32, hidden, chunk)

    def chunks(self, vector: Tensor) -> Tensor:
        """``[n_chunks, chunk]``: the standardised vector, zero-padded."""
        v = (vector - self.mean) / self.std
        return F.pad(v, (0, self.n_chunks * self.chunk - v.numel())).reshape(self.n_chunks, self.chunk)

    def condition(self, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(π, c)`` of :func:`semantic_condition`, ``c`` centred on the experts' conditions and scaled by one
        scalar std (set by :func:`fit_sglora`)."""
        pi, cond = semantic_condition(target, self.experts, self.top_k, self.tau)
        return pi, (cond - self.cond_mean) / self.cond_std

    def decode(self, z: Tensor, cond: Tensor) -> Tensor:
        """The LoRA vector (de-standardised, unpadded) for latents ``z`` ``[n_chunks, latent]``."""
        pos = self.position.weight
        out = self.decoder(torch.cat([z, cond.expand(self.n_chunks, -1), pos], -1))
        return out.reshape(-1)[: self.layout.size] * self.std + self.mean

    def loss(self, vector: Tensor, cond: Tensor, beta: float) -> Tensor:
        x = self.chunks(vector)
        c = cond.expand(self.n_chunks, -1)
        mu, logvar = self.encoder(torch.cat([x, c, self.position.weight], -1)).chunk(2, -1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        recon = self.decoder(torch.cat([z, c, self.position.weight], -1))
        kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(-1).mean()
        return F.mse_loss(recon, x) + beta * kl

    @torch.no_grad()
    def generate(
        self, target: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``(π, tensors)`` for a target description embedding: the decoded LoRA at ``z = 0`` (or ``z ~ N(0, I)``
        with ``sample=True``), keyed as :meth:`AdaptedModel.adapter_state_dict` (for ``load_tensors``)."""
        pi, cond = self.condition(target)
        z = torch.zeros(self.n_chunks, self.latent)
        if sample:
            z = torch.randn(self.n_chunks, self.latent, generator=generator)
        return pi, self.layout.unflatten(self.decode(z, cond))


def fit_sglora(
    model: AdaptedModel,
    names: Sequence[str],
    descriptions: Tensor,
    *,
    top_k: int = 3,
    tau: float = 0.1,
    beta: float = 1e-3,
    latent: int = 64,
    hidden: int = 256,
    chunk: int = 256,
    steps: int = 500,
    lr: float = 1e-3,
    noise: float = 0.0,
    seed: int = 0,
) -> SGLoRA:
    """Train SG-LoRA's CVAE on the expert adapters ``names`` of ``model`` with their description embeddings
    ``descriptions`` ``[E, d]`` (row ``e`` describes ``names[e]``). ``top_k`` is capped at ``E``. The adapters and
    the model are not changed.

    Raises:
        MergeOptionError: a description count that is not one per adapter, bad ``top_k``/``τ``/``β``/``steps``/
            ``noise``/``chunk``/``latent``.
        MergeError: adapters with different tensors (one layout is needed).
        AdapterNotFoundError: a name the model does not hold.
    """
    names = list(names)
    for n in names:
        model.require(n)
    if descriptions.dim() != 2 or descriptions.shape[0] != len(names):
        raise MergeOptionError(
            f"need one description embedding per adapter ({len(names)}), got {tuple(descriptions.shape)}"
        )
    for key, value in (("steps", steps), ("chunk", chunk), ("latent", latent), ("hidden", hidden)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MergeOptionError(f"{key} must be a positive int, got {value!r}")
    if not (math.isfinite(beta) and beta >= 0 and math.isfinite(noise) and noise >= 0 and lr > 0):
        raise MergeOptionError(f"beta and noise must be >= 0 and lr > 0, got beta={beta}, noise={noise}, lr={lr}")
    layout = LoRALayout.of(model, names)
    vectors = torch.stack([layout.flatten(model.adapter_state_dict(n)) for n in names])
    top_k = min(top_k, len(names))
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cvae = SGLoRA(layout, descriptions, chunk=chunk, latent=latent, hidden=hidden, top_k=top_k, tau=tau)
        cvae.mean.copy_(vectors.mean(0))
        cvae.std.fill_(float((vectors - cvae.mean).std()) if len(names) > 1 else 1.0)
        if not cvae.std > 0:  # identical experts: nothing to model beyond the mean
            cvae.std.fill_(1.0)
        raw = torch.stack([cvae.condition(descriptions[e])[1] for e in range(len(names))])
        cvae.cond_mean.copy_(raw.mean(0))
        cvae.cond_std.fill_(float((raw - cvae.cond_mean).std()) if len(names) > 1 else 1.0)
        if not cvae.cond_std > 0:
            cvae.cond_std.fill_(1.0)
        conds = [cvae.condition(descriptions[e])[1] for e in range(len(names))]
        opt = torch.optim.Adam(cvae.parameters(), lr=lr)
        for step in range(steps):
            e = step % len(names)
            v = vectors[e]
            if noise:
                v = v + noise * cvae.std * torch.randn(v.shape, generator=g)  # the scale the CVAE models
            opt.zero_grad()
            cvae.loss(v, conds[e], beta).backward()
            opt.step()
    return cvae.eval()
