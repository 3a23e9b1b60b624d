"""IncreLoRA (Zhang et al., 2023, "IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient
Fine-tuning").

Each module holds rank-1 components ``(A_i [1, in], E_i, B_i [out, 1])`` that *grow* during training:

``ΔW = B (A ⊙ E) · alpha / (ranknum + 1e-5)``, ``y = x Wᵀ + b + drop(x) ΔWᵀ`` (exact merge),

with ``A [k, in]``, ``E [k]``, ``B [out, k]`` the concatenation of the active components and the *reserve*
(note: ``alpha`` divided by the active rank ``ranknum``, not ``alpha / r``). Init (official
``loralib/increlora.py``): ``r`` (``lora_r``, 1 in the scripts) active components with ``A, B ~ N(0, 0.02²)``,
``E = 0``; plus ``incre_rank_num`` reserve components whose ``A, B`` train ("advance learning") while their
``E`` is a frozen buffer at ``1e-5`` (``0`` with ``advance_learn=False``).

Tensors: ``A.<j>``, ``B.<j>``, ``E.<j>`` (``nn.ParameterList`` chunks: the initial components, then one
chunk per allocation), ``A_res``, ``B_res`` (trainable), ``E_res`` and ``ranknum`` (persistent buffers).

Allocation (model level, :class:`IncreLoRAAllocator`): each module's importance is
``score = Σ|ΔW ⊙ ∂L/∂ΔW| / sqrt(numel ΔW)`` from a backward hook on the composed ``ΔW`` (summed over the
micro-batches of a step); :meth:`IncreLoRA.step` (the trainer's per-step hook) folds it into the EMAs
``Ī ← β₁Ī + (1−β₁)·score``, ``Ū ← β₂Ū + (1−β₂)·|score − Ī|``; priority ``Ī·Ū``. Every ``incre_interval``
steps after ``init_warmup``, while the total rank is below ``target_rank × #modules``, the allocator picks the
``min(top_h, remaining)`` modules of highest priority; each promotes its reserve (``ranknum +=
incre_rank_num``, its ``E`` becomes a trainable parameter) and appends a new reserve. The new parameters are
returned so that the trainer adds them as new param groups (:class:`peftkit.train.callbacks.GrowthCallback`,
``HFAdapterCallback(schedules=[allocator])``). When the target is reached the hooks stop and the last
reserve's ``E`` is set to 0. ``remaining = (target_total − total) // incre_rank_num`` (inferred: the spec
requires the total never to exceed the target; the official loop does not floor).

Regulariser (:func:`increlora_orth_penalty`, add to the loss): ``reg_orth_coef · mean ||P Pᵀ − I||_F``; the
official code applies it to every rank-1 ``lora_A``/``lora_B`` vector, i.e. ``| ||v||² − 1 |`` per vector
(``orth_mode="per_vector"``, default, spec decision); ``"full"`` applies it to each module's whole ``A`` and
``B``.

Saving: the adapter's tensors grow while ``adapter.json`` records only the config; a *grown* adapter still
reloads, with ``pk.load`` / ``load_adapter`` as with ``load_state_dict``: :meth:`IncreLoRA.fit_state` appends
the chunks the saved file has before its values are copied in. Supported: ``Linear`` and GPT-2 ``Conv1D``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from peftkit.core.api import (
    AdaptedModel,
    Adapter,
    AdapterConfig,
    BaseView,
    InvalidConfigError,
    LowRank,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    add_lowrank,
    input_dropout,
    register,
)

RESERVE_E = 1e-5


@dataclass(kw_only=True)
class IncreLoRAConfig(AdapterConfig):
    """Settings of IncreLoRA (defaults: the official RTE script, target rank 2).

    Attributes:
        r: initial number of active components per module (``lora_r``).
        target_rank: average rank per module at the end; the budget is ``target_rank × #modules``.
        incre_rank_num: components added per allocation to a chosen module (and the reserve size); ``None``:
            the official map ``{2: 1, 4: 2, 6: 3, 8: 4}``, i.e. ``max(1, target_rank // 2)``.
        top_h: modules grown per allocation (fewer when the budget runs out).
        init_warmup: steps before the first allocation.
        incre_interval: steps between allocations.
        beta1: EMA factor of the importance ``Ī``.
        beta2: EMA factor of the uncertainty ``Ū``.
        alpha: scale numerator; ``ΔW`` is scaled by ``alpha / (ranknum + 1e-5)``.
        dropout: dropout probability on the adapter branch's input.
        advance_learn: reserve components contribute with ``E = 1e-5`` (so their ``A``, ``B`` learn before they
            are allocated); ``False``: reserve ``E = 0`` (exact identity at init).
        reg_orth_coef: coefficient of :func:`increlora_orth_penalty`.
        orth_mode: ``"per_vector"`` (official) or ``"full"``; see the module docstring.
        init_std: standard deviation of the ``A``, ``B`` init.
    """

    r: PositiveInt = 1
    target_rank: PositiveInt = 2
    incre_rank_num: PositiveInt | None = None
    top_h: PositiveInt = 5
    init_warmup: NonNegativeInt = 100
    incre_interval: PositiveInt = 100
    beta1: Probability = 0.85
    beta2: Probability = 0.85
    alpha: PositiveFloat = 32.0
    dropout: Probability = 0.0
    advance_learn: bool = True
    reg_orth_coef: NonNegativeFloat = 0.3
    orth_mode: Literal["per_vector", "full"] = "per_vector"
    init_std: PositiveFloat = 0.02

    def validate(self) -> None:
        if self.target_rank < self.r:
            raise InvalidConfigError(f"target_rank ({self.target_rank}) must be >= the initial rank r ({self.r})")

    @property
    def reserve(self) -> int:
        """Components per allocation (``incre_rank_num``)."""
        return self.incre_rank_num or max(1, self.target_rank // 2)

    tiny_fields: ClassVar[dict] = {"r": 1, "target_rank": 2, "alpha": 4.0, "advance_learn": False, "init_std": 0.2}
    variant_fields: ClassVar[list[dict]] = [{"r": 2, "target_rank": 4, "dropout": 0.1}]


@register("increlora", IncreLoRAConfig)
class IncreLoRA(Adapter[IncreLoRAConfig]):
    """Growing rank-1 components with importance-based allocation; see the module docstring."""

    def __init__(self, base: BaseView, config: IncreLoRAConfig) -> None:
        super().__init__(base, config)
        r, m = config.r, config.reserve
        self.in_features, self.out_features = base.in_features, base.out_features
        std = config.init_std
        self.A = nn.ParameterList([nn.Parameter(torch.randn(r, base.in_features) * std)])
        self.B = nn.ParameterList([nn.Parameter(torch.randn(base.out_features, r) * std)])
        self.E = nn.ParameterList([nn.Parameter(torch.zeros(r))])
        self.A_res = nn.Parameter(torch.randn(m, base.in_features) * std)
        self.B_res = nn.Parameter(torch.randn(base.out_features, m) * std)
        self.register_buffer("E_res", torch.full((m,), self._reserve_value()))
        self.register_buffer("ranknum", torch.tensor(float(r)))
        self.dropout = input_dropout(config.dropout)
        self.tracking = True  # importance hooks on (until the allocator reaches the budget)
        self.exp_avg_ipt = 0.0
        self.exp_avg_unc = 0.0
        self._score: float | None = None

    def _reserve_value(self) -> float:
        return RESERVE_E if self.config.advance_learn else 0.0

    # ------------------------------------------------------------------------------------------- factors
    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``A [k, in]``, ``E [k]``, ``B [out, k]``: active components then the reserve."""
        a = torch.cat([*self.A, self.A_res])
        e = torch.cat([*self.E, self.E_res.to(self.A_res.dtype)])
        b = torch.cat([*self.B, self.B_res], dim=1)
        return a, e, b

    @property
    def scale(self) -> float:
        return self.config.alpha / (float(self.ranknum) + 1e-5)

    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        a, e, b = self.factors()
        scale = self.config.alpha / (self.ranknum + 1e-5)
        if self.training and self.tracking and torch.is_grad_enabled():
            dw = (b @ (a * e[:, None])) * scale  # the composed ΔW: its gradient gives the importance score
            if dw.requires_grad:
                dw.register_hook(self._hook(dw.detach()))
            return base_out + self.dropout(x) @ dw.T
        hidden = self.dropout(x) @ (a * e[:, None]).T
        return add_lowrank(base_out, hidden, b * scale)

    def _hook(self, dw: Tensor) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            score = float((dw * grad).abs().sum()) / math.sqrt(dw.numel())
            self._score = score if self._score is None else self._score + score

        return hook

    def delta_weight(self, base: BaseView) -> Tensor:
        a, e, b = self.factors()
        return self.scale * (b @ (a * e[:, None]))

    def lowrank(self, base: BaseView) -> LowRank:
        a, e, b = self.factors()
        return LowRank(a * e[:, None], b, self.scale)

    def effective_rank(self) -> int:
        """The number of active (allocated) components, ``ranknum``."""
        return int(self.ranknum)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: IncreLoRAConfig) -> int:
        # at construction: r active components (A, E, B) + the reserve's A and B (its E is a frozen buffer)
        return config.r * (base.in_features + base.out_features + 1) + config.reserve * (
            base.in_features + base.out_features
        )

    # ----------------------------------------------------------------------------------------- importance
    def step(self, global_step: int) -> None:
        """Fold this step's importance score into the EMAs (official ``RankAllocator.update_ipt``)."""
        if self._score is None:
            return
        c = self.config
        self.exp_avg_ipt = c.beta1 * self.exp_avg_ipt + (1 - c.beta1) * self._score
        self.exp_avg_unc = c.beta2 * self.exp_avg_unc + (1 - c.beta2) * abs(self._score - self.exp_avg_ipt)
        self._score = None

    @property
    def priority(self) -> float:
        """``Ī · Ū``: the allocator grows the modules with the largest priority."""
        return self.exp_avg_ipt * self.exp_avg_unc

    @torch.no_grad()
    def grow(self) -> list[nn.Parameter]:
        """Promote the reserve to active components (``ranknum += incre_rank_num``, its ``E`` becomes
        trainable) and append a new reserve. Returns the parameters created (for the optimizer)."""
        trainable = self.A_res.requires_grad
        m, std = self.config.reserve, self.config.init_std
        e = nn.Parameter(self.E_res.clone().to(self.A_res.dtype), requires_grad=trainable)
        self.A.append(self.A_res)
        self.B.append(self.B_res)
        self.E.append(e)
        like = {"device": self.A_res.device, "dtype": self.A_res.dtype}
        self.A_res = nn.Parameter(torch.randn(m, self.in_features, **like) * std, requires_grad=trainable)
        self.B_res = nn.Parameter(torch.randn(self.out_features, m, **like) * std, requires_grad=trainable)
        self.E_res.fill_(self._reserve_value())
        self.ranknum += m
        return [e, self.A_res, self.B_res]

    @torch.no_grad()
    def stop_growing(self) -> None:
        """The budget is reached: no more importance hooks, the last reserve's ``E`` is set to 0."""
        self.tracking = False
        self.E_res.zero_()

    # ---------------------------------------------------------------------------------------------- loading
    def fit_state(self, state: dict[str, Tensor]) -> None:
        """A grown adapter has more chunks than a fresh one: add them (empty) before the saved ones are
        copied in. A loaded adapter is not in its growth phase (create an :class:`IncreLoRAAllocator` to
        resume)."""
        for name in ("A", "B", "E"):
            plist: nn.ParameterList = getattr(self, name)
            while f"{name}.{len(plist)}" in state:
                src = state[f"{name}.{len(plist)}"]
                like = {"device": self.A_res.device, "dtype": self.A_res.dtype}
                plist.append(nn.Parameter(torch.empty_like(src, **like), requires_grad=self.A_res.requires_grad))
        self.tracking = False

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # torch's load_state_dict path (pk.load uses fit_state directly)
        self.fit_state({k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class IncreLoRAAllocator:
    """The model-level allocator: call :meth:`step` after every optimizer step (after
    ``model.step_adapters``); it returns the parameters it created, for the optimizer.

    Use ``GrowthCallback(allocator)`` with :class:`peftkit.train.Trainer` or
    ``HFAdapterCallback(schedules=[allocator])`` with ``transformers.Trainer``.

    Attributes:
        target_total: ``target_rank × #modules``.
        history: one dict per allocation: ``step``, ``grown`` (module paths), ``total``.
    """

    def __init__(self, model: AdaptedModel, adapter: str | None = None) -> None:
        self.modules = model.modules_of(adapter, IncreLoRA)
        self.config: IncreLoRAConfig = next(iter(self.modules.values())).config
        self.target_total = self.config.target_rank * len(self.modules)
        self.history: list[dict[str, Any]] = []
        self.done = False
        if self.remaining() == 0:
            self.finish()

    @property
    def total_rank(self) -> int:
        return sum(m.effective_rank() for m in self.modules.values())

    def remaining(self) -> int:
        """How many more single-module increments fit in the budget."""
        return max(0, (self.target_total - self.total_rank) // self.config.reserve)

    def due(self, global_step: int) -> bool:
        c = self.config
        return global_step > c.init_warmup and (global_step - c.init_warmup) % c.incre_interval == 0

    def step(self, global_step: int) -> list[nn.Parameter]:
        """Allocate if ``global_step`` is an allocation step; returns the new parameters (may be empty)."""
        if self.done or not self.due(global_step):
            return []
        k = min(self.config.top_h, self.remaining())
        ranked = sorted(self.modules, key=lambda p: self.modules[p].priority, reverse=True)[:k]
        new: list[nn.Parameter] = []
        for path in ranked:
            new.extend(self.modules[path].grow())
        self.history.append({"step": global_step, "grown": ranked, "total": self.total_rank})
        if self.remaining() == 0:
            self.finish()
        return new

    def finish(self) -> None:
        """Stop growing: hooks off, last reserves' ``E`` set to 0."""
        self.done = True
        for m in self.modules.values():
            m.stop_growing()


def increlora_orth_penalty(model: AdaptedModel, adapter: str | None = None) -> Tensor:
    """``reg_orth_coef · mean ||P Pᵀ − I||_F`` over the adapter's ``A`` / ``B`` tensors (add it to the loss);
    per rank-1 vector (official) or per whole matrix, by the config's ``orth_mode``."""
    modules = list(model.modules_of(adapter, IncreLoRA).values())
    cfg = modules[0].config
    terms: list[Tensor] = []
    for m in modules:
        a = torch.cat([*m.A, m.A_res])
        b = torch.cat([*m.B, m.B_res], dim=1).T  # one row per component
        if cfg.orth_mode == "per_vector":
            terms.extend([(a.pow(2).sum(1) - 1).abs(), (b.pow(2).sum(1) - 1).abs()])
        else:
            eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
            terms.extend([torch.linalg.norm(a @ a.T - eye).reshape(1), torch.linalg.norm(b @ b.T - eye).reshape(1)])
    return cfg.reg_orth_coef * torch.cat(terms).mean()
