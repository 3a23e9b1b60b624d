"""Poly / MHR (and the MHR-z / MHR-μ procedures): a routed inventory of LoRA skills.

Ponti et al., 2023, "Combining Parameter-efficient Modules for Task-level Generalisation" (Poly) and Caccia et
al., 2023, "Multi-Head Adapter Routing for Cross-Task Generalization" (MHR); PEFT ``PolyConfig`` /
``tuners/poly``; official code ``microsoft/mttl``.

Each adapted Linear holds ``S`` LoRA skills split into ``Q`` heads along the feature axes,
``A [Q, S, in/Q, r]`` and ``B [Q, S, r, out/Q]``, and a router ``module_logits [T, Q·S]`` (one row per task).
For a row of task ``t`` the router gives ``z = module_logits[t].view(Q, S)``; in training
``w̃ = RelaxedBernoulli(temperature 1, logits z).rsample()``, in eval ``w̃ = σ(z)``; ``w = w̃ / (Σ_s w̃ + 1e-12)``
per head. Then ``A_q = Σ_s w_{q,s} A[q, s]``, ``B_q = Σ_s w_{q,s} B[q, s]``, ``A = concat_q A_q`` (input axis),
``B = concat_q B_q`` (output axis) and ``y = base(x) + c · x A B``. Poly is ``Q = 1``, MHR ``Q > 1``.

Task ids reach the adapter through the core's generic ``model(..., task_ids=ids)`` (this class declares
``uses_context`` and reads ``context.task_ids``). Rows without task ids use :attr:`Poly.task` (set with
:func:`set_task`), or task 0 when the adapter has a single task; otherwise the call raises
:class:`AdapterIdsError` naming the fix.

*Decision*: the PEFT behaviour — scale ``c = 1/r`` (``scaling="alpha/r"`` gives the official
``alpha/r``), ``A`` Kaiming-uniform (``a=√5``) per (head, skill) slice of shape ``(r, in/Q)``, drawn in PEFT's
order (skills outer, heads inner, so one seed gives PEFT's initial values), ``B = 0`` (identity at init),
logits ``U(−1e-3, 1e-3)``. The official straight-through / L2-norm / logit-dropout /
shared-skill options are not implemented.

Merge: for one fixed task (eval-mode weights ``σ``) ``ΔW = c · (A B)ᵀ`` is exact; a single merge cannot serve
several tasks, so with ``n_tasks > 1`` merging needs :func:`set_task` first (else :class:`NotMergeableError`).

MHR-z (few-shot): :func:`mhr_z` adds an adapter whose skills are copied from a trained one and frozen
(``freeze_skills=True``: ``A``/``B`` become saved buffers) and whose router is freshly initialised for the new
task(s); only ``module_logits`` trains. MHR-μ: :func:`mhr_mu` adds a plain LoRA adapter with
``A* = mean_s A[:, s]``, ``B* = mean_s B[:, s]`` per head (the uniform-weight router's output) to fine-tune.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from peftkit.core.api import (
    AdaptedModel,
    Adapter,
    AdapterConfig,
    AdapterIdsError,
    BaseView,
    ForwardContext,
    LowRank,
    NotMergeableError,
    PositiveFloat,
    PositiveInt,
    UnsupportedLayerError,
    add_lowrank,
    register,
)

EPS = 1e-12  # PEFT / mttl: w = w̃ / (Σ w̃ + EPS)


@dataclass(kw_only=True)
class PolyConfig(AdapterConfig):
    """Settings of Poly / MHR.

    Attributes:
        r: rank of every skill.
        n_skills: ``S``, LoRA skills in each layer's inventory (PEFT default 4).
        n_splits: ``Q``, routing heads; ``1`` is Poly, ``> 1`` is MHR (must divide the layer's in and out).
        n_tasks: ``T``, rows of the router (task ids run from 0 to ``T − 1``).
        scaling: ``"1/r"`` (PEFT, default) or ``"alpha/r"`` (official mttl).
        alpha: numerator of ``"alpha/r"`` (ignored with ``"1/r"``).
        freeze_skills: MHR-z: the skills ``A``/``B`` are frozen (saved buffers); only the router trains.
        train_routing: ``"relaxed_bernoulli"`` (PEFT / paper, default): training samples the weights;
            ``"sigmoid"``: training uses the deterministic eval weights too (*inferred* option, not in PEFT:
            noise-free routing, and what :meth:`tiny` uses, since the conformance suite compares mixed-batch rows
            in training mode, where sampled routing — like dropout — differs call to call).
    """

    r: PositiveInt = 8
    n_skills: PositiveInt = 4
    n_splits: PositiveInt = 1
    n_tasks: PositiveInt = 1
    scaling: Literal["1/r", "alpha/r"] = "1/r"
    alpha: PositiveFloat = 8.0
    freeze_skills: bool = False
    train_routing: Literal["relaxed_bernoulli", "sigmoid"] = "relaxed_bernoulli"

    @property
    def scale(self) -> float:
        return (self.alpha if self.scaling == "alpha/r" else 1.0) / self.r

    tiny_fields: ClassVar[dict] = {"r": 2, "n_skills": 3, "train_routing": "sigmoid"}
    variant_fields: ClassVar[list[dict]] = [{"n_splits": 2, "scaling": "alpha/r", "alpha": 4.0}]


@register("poly", PolyConfig)
class Poly(Adapter[PolyConfig]):
    """``y = base(x) + c · x A_t B_t`` with the task's routed mixture of skills (see the module docstring)."""

    uses_context = True

    def __init__(self, base: BaseView, config: PolyConfig) -> None:
        super().__init__(base, config)
        q, s, r = config.n_splits, config.n_skills, config.r
        d_in, d_out = base.in_features, base.out_features
        if d_in % q or d_out % q:
            raise UnsupportedLayerError(
                f"n_splits={q} must divide the layer's in ({d_in}) and out ({d_out}) features (spec: d % Q == 0)"
            )
        a, b = torch.empty(q, s, d_in // q, r), torch.empty(q, s, r, d_out // q)
        if config.freeze_skills:  # MHR-z: the skills come from multi-task training and stay fixed
            self.register_buffer("A", a)
            self.register_buffer("B", b)
        else:
            self.A, self.B = nn.Parameter(a), nn.Parameter(b)
        self.module_logits = nn.Parameter(torch.empty(config.n_tasks, q * s))
        self.scale = config.scale
        self.d_in, self.d_out = d_in, d_out
        #: the task of rows that come without task ids, and the task a merge folds in (not saved)
        self.task: int | None = 0 if config.n_tasks == 1 else None

    def reset_parameters(self, base: BaseView) -> None:
        q, s, _, r = self.A.shape
        # PEFT (and mttl): torch's Linear init per (head, skill) slice of shape (r, in/Q), drawn skill by skill
        # and, within a skill, head by head: the same seed gives PEFT's A (then the router's logits).
        for skill in range(s):
            for split in range(q):
                slice_ = torch.empty(r, self.d_in // q)
                nn.init.kaiming_uniform_(slice_, a=math.sqrt(5))
                self.A[split, skill] = slice_.T
        self.B.zero_()
        nn.init.uniform_(self.module_logits, -1e-3, 1e-3)

    # ------------------------------------------------------------------------------------------------ routing
    def mixing_weights(self, task_ids: Tensor) -> Tensor:
        """``w [N, Q, S]`` for tasks ``task_ids [N]``: relaxed-Bernoulli samples in training, ``σ`` in eval,
        normalised per head."""
        if task_ids.numel() and int(task_ids.max()) >= self.config.n_tasks:
            raise AdapterIdsError(
                f"task id {int(task_ids.max())} out of range: this Poly adapter has n_tasks={self.config.n_tasks}"
            )
        logits = self.module_logits[task_ids.to(self.module_logits.device)]
        logits = logits.view(-1, self.config.n_splits, self.config.n_skills)
        if self.training and self.config.train_routing == "relaxed_bernoulli":
            w = RelaxedBernoulli(temperature=torch.tensor(1.0, device=logits.device), logits=logits).rsample()
        else:
            w = torch.sigmoid(logits)
        return w / (w.sum(dim=-1, keepdim=True) + EPS)

    @torch.no_grad()
    def routing_weights(self, task_id: int | None = None) -> Tensor:
        """The deterministic (eval) mixing weights ``[Q, S]`` of one task, or ``[T, Q, S]`` of every task."""
        was = self.training
        self.train(False)
        try:
            ids = torch.arange(self.config.n_tasks) if task_id is None else torch.tensor([task_id])
            w = self.mixing_weights(ids)
        finally:
            self.train(was)
        return w if task_id is None else w[0]

    def factors(self, weights: Tensor) -> tuple[Tensor, Tensor]:
        """The mixed ``A [N, in, r]`` and ``B [N, r, out]`` for mixing weights ``[N, Q, S]``."""
        n, r = weights.shape[0], self.config.r
        a = torch.einsum("nqs,qsdr->nqdr", weights.to(self.A.dtype), self.A).reshape(n, self.d_in, r)
        b = torch.einsum("nqs,qsrd->nqrd", weights.to(self.B.dtype), self.B)
        return a, b.transpose(1, 2).reshape(n, r, self.d_out)

    def _task_ids(self, task_ids: Tensor | None, rows: int) -> Tensor:
        if task_ids is None:
            if self.task is None:
                raise AdapterIdsError(
                    f"this Poly adapter routes {self.config.n_tasks} tasks: pass model(..., task_ids=ids) "
                    "or fix one task with peftkit.methods.poly.set_task(model, adapter, task)"
                )
            return torch.full((rows,), self.task, dtype=torch.long)
        if task_ids.shape[0] != rows:
            raise AdapterIdsError(f"got {task_ids.shape[0]} task ids for a layer input with {rows} rows")
        return task_ids

    # ---------------------------------------------------------------------------------------------- contract
    def forward(self, x: Tensor, base_out: Tensor, base: BaseView, context: ForwardContext | None = None) -> Tensor:
        rows = x.shape[0] if x.dim() > 1 else 1
        ids = self._task_ids(None if context is None else context.task_ids, rows)
        if not self.training or self.config.train_routing == "sigmoid":  # deterministic: one mixture per task
            tasks, inverse = ids.unique(return_inverse=True)
            if tasks.numel() == 1:
                a, b = self.factors(self.mixing_weights(tasks))
                return add_lowrank(base_out, x.to(a.dtype) @ a[0], b[0].T, self.scale).to(base_out.dtype)
            a, b = self.factors(self.mixing_weights(tasks))
            a, b = a[inverse.to(a.device)], b[inverse.to(b.device)]
        else:  # PEFT / mttl: one relaxed-Bernoulli sample per row
            a, b = self.factors(self.mixing_weights(ids))
        xs = x.reshape(rows, -1, self.d_in).to(a.dtype)
        delta = torch.bmm(torch.bmm(xs, a), b) * self.scale
        return (base_out + delta.view(base_out.shape).to(base_out.dtype)).to(base_out.dtype)

    def _fixed_factors(self) -> tuple[Tensor, Tensor]:
        if self.task is None:
            raise NotMergeableError(
                f"method 'poly' merges one task at a time and this adapter routes {self.config.n_tasks} tasks: "
                "fix one with peftkit.methods.poly.set_task(model, adapter, task) first"
            )
        was = self.training
        self.train(False)  # the merge folds the deterministic (eval) mixture
        try:
            a, b = self.factors(self.mixing_weights(torch.tensor([self.task])))
        finally:
            self.train(was)
        return a[0], b[0]

    def delta_weight(self, base: BaseView) -> Tensor:
        a, b = self._fixed_factors()
        return self.scale * (a @ b).T

    def lowrank(self, base: BaseView) -> LowRank | None:
        # Only a single-task adapter is one fixed low-rank product (a cached serving bank cannot see task ids).
        if self.config.n_tasks != 1:
            return None
        a, b = self._fixed_factors()
        return LowRank(a.T, b.T, self.scale)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: PolyConfig) -> int:  # type: ignore[override]
        skills = 0 if config.freeze_skills else config.n_skills * config.r * (base.in_features + base.out_features)
        return skills + config.n_tasks * config.n_splits * config.n_skills


# -------------------------------------------------------------------------------------------------- helpers
def set_task(model: AdaptedModel, name: str, task: int | None) -> None:
    """Fix the task of adapter ``name``: rows without task ids use it and :meth:`AdaptedModel.merge` folds its
    mixture (exact, eval-mode weights). ``None`` clears it (then task ids are required). Not saved."""
    modules = model.modules_of(name, Poly)
    n_tasks = model.configs[name].n_tasks  # type: ignore[attr-defined]
    if task is not None and not 0 <= task < n_tasks:
        raise AdapterIdsError(f"task {task} out of range: adapter {name!r} has n_tasks={n_tasks}")
    for module in modules.values():
        module.task = task


def routing_table(model: AdaptedModel, name: str) -> dict[str, Tensor]:
    """``{module path: eval-mode mixing weights [T, Q, S]}`` of Poly adapter ``name``."""
    return {path: m.routing_weights() for path, m in model.modules_of(name, Poly).items()}


@torch.no_grad()
def mhr_z(model: AdaptedModel, source: str, name: str, n_tasks: int = 1, *, seed: int | None = None) -> None:
    """MHR-z: add adapter ``name`` with the skills of ``source`` copied and frozen and a fresh router for
    ``n_tasks`` new tasks; only the router trains. The new adapter becomes the active one."""
    config = model.configs[source].replace(n_tasks=n_tasks, freeze_skills=True, seed=seed)
    model.add_adapter(name, config, activate=True)
    new = model.modules_of(name, Poly)
    for path, old in model.modules_of(source, Poly).items():
        new[path].A.copy_(old.A)
        new[path].B.copy_(old.B)


@torch.no_grad()
def mhr_mu(model: AdaptedModel, source: str, name: str) -> None:
    """MHR-μ: add a plain LoRA adapter ``name`` on the layers of Poly adapter ``source`` with
    ``A* = mean_s A[:, s]`` and ``B* = mean_s B[:, s]`` per head (the uniform-weight router's factors) and the
    same scale; it becomes the active adapter, to be fine-tuned as ordinary LoRA."""
    from peftkit.methods.lora import LoRAConfig

    poly = model.modules_of(source, Poly)
    config: PolyConfig = model.configs[source]  # type: ignore[assignment]
    lora = LoRAConfig(r=config.r, alpha=config.scale * config.r, targets=list(poly))
    model.add_adapter(name, lora, activate=True)
    for path, adapter in model.adapter_modules(name).items():
        source_module = poly[path]
        uniform = torch.full((1, config.n_splits, config.n_skills), 1.0 / config.n_skills)
        a, b = source_module.factors(uniform)
        adapter.A.copy_(a[0].T)
        adapter.B.copy_(b[0].T)
