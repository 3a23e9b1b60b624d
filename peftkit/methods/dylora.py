"""DyLoRA (Valipour et al., 2023, "DyLoRA: Parameter Efficient Tuning of Pre-trained Models using Dynamic
Search-Free Low-Rank Adaptation").

One LoRA pair of the largest rank ``r`` (``A [r, in]``, ``B [out, r]``) holds nested adapters of every rank
``k ≤ r``: the rank-``k`` adapter uses the first ``k`` components,

``y = x Wᵀ + b + (alpha / k) · B[:, :k] A[:k] drop(x)``, ``ΔW_k = (alpha / k) · B[:, :k] A[:k]``

(the official code scales ``A_k`` and ``B_k`` by ``sqrt(r / k)`` each on top of ``alpha / r``: the same).
Init as LoRA (``A`` Kaiming-uniform, ``B = 0``): identity at init.

Training draws a rank index ``b ~ U{0, …, r−1}`` at every optimizer step, *one value for all layers*, and
trains the rank ``k = b + 1`` adapter. In the default "frozen" mode (official; ``update_all_below=False``)
the components ``< b`` are detached, so only component ``b`` (row ``A[b]``, column ``B[:, b]``) gets a gradient.

State is explicit, per module: ``train_rank`` (used in training mode) and ``eval_rank`` (used in eval mode,
by :meth:`delta_weight` / :meth:`lowrank`, hence by merging and mixed batches; default ``r`` or
``config.eval_rank``). ``eval_rank`` is a persistent buffer, so a rank chosen with :meth:`DyLoRA.set_rank` /
:func:`set_rank` is saved with the adapter and a reloaded adapter runs at that rank. ``train_rank`` is not
saved: it is redrawn before every optimizer step. Two ways to draw it, both with no global state:

* :meth:`DyLoRA.step`, i.e. ``model.step_adapters(global_step)``: ``step(s)`` draws the rank that trains in the
  optimizer step that follows step ``s`` (``s`` updates done), from a generator seeded by
  ``(config.seed or 0, s)``; every layer of the adapter shares the config, so every layer draws the same rank
  (inferred: the official callback uses the global torch RNG). peftkit's trainers call it once before the
  first optimizer step (``step(0)`` draws the first rank) and after every optimizer step with the new
  ``global_step``. **A plain PyTorch loop must do the same**: without ``step_adapters`` the adapter keeps
  training rank ``r`` only (component ``r − 1`` in the frozen mode), and the lower ranks never train.
* :func:`sample_rank` with an explicit ``torch.Generator`` (set ``sample_in_step=False`` to use it alone).

Supported layers: ``nn.Linear`` and GPT-2 ``Conv1D``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from peftkit.core.api import (
    Adapter,
    BaseView,
    InvalidConfigError,
    LowRank,
    PositiveInt,
    RankConfig,
    add_lowrank,
    init_lora_pair,
    input_dropout,
    lowrank_pair,
    register,
    require_rank_fits,
)

from .lora import modules_in_all_adapters


@dataclass(kw_only=True)
class DyLoRAConfig(RankConfig):
    """Settings of DyLoRA (defaults: the official GLUE scripts, RoBERTa-base).

    Attributes:
        r: the largest rank ``r_max``; every rank ``1..r`` is a valid adapter.
        alpha: scale numerator; the rank-``k`` adapter is scaled by ``alpha / k`` (:attr:`scale`, ``alpha / r``,
            is the scale of the largest one). Default 16.
        dropout: dropout probability on the adapter branch's input (off in eval mode).
        update_all_below: ``False`` (official "frozen" mode): in training only component ``b = k − 1`` gets a
            gradient; ``True``: every component ``< k`` trains.
        eval_rank: the rank used in eval mode and for merging (``None``: ``r``); change it with
            :meth:`DyLoRA.set_rank` / :func:`set_rank`.
        sample_in_step: draw the training rank in :meth:`DyLoRA.step` (once per optimizer step).
    """

    alpha: float = 16.0
    update_all_below: bool = False
    eval_rank: PositiveInt | None = None
    sample_in_step: bool = True

    def validate(self) -> None:
        if self.eval_rank is not None and self.eval_rank > self.r:
            raise InvalidConfigError(f"eval_rank must lie in [1, r={self.r}], got {self.eval_rank!r}")

    tiny_fields: ClassVar[dict] = {"r": 3, "alpha": 6.0}
    variant_fields: ClassVar[list[dict]] = [
        {"eval_rank": 2, "dropout": 0.1},
        {"update_all_below": True, "eval_rank": 1},
    ]


@register("dylora", DyLoRAConfig)
class DyLoRA(Adapter[DyLoRAConfig]):
    """Nested-rank LoRA; see the module docstring."""

    def __init__(self, base: BaseView, config: DyLoRAConfig) -> None:
        super().__init__(base, config)
        r = config.r
        require_rank_fits(r, base)
        self.alpha = config.alpha
        self.A, self.B = lowrank_pair(base, r)
        self.dropout = input_dropout(config.dropout)
        self.train_rank = r
        self.frozen = not config.update_all_below
        k = config.eval_rank or r
        # The eval rank is a persistent buffer: it is saved, so a rank set with set_rank survives save -> load.
        # Writing it bumps its tensor version, which also makes the core rebuild its cached mixed-batch bank.
        # The Python int is a cache of the buffer (slicing needs an int; reading the tensor in every forward
        # would synchronise with the GPU), re-read whenever the buffer was replaced or written to (loading
        # copies the saved value into it, ``load_state_dict`` too).
        self.register_buffer("eval_rank", torch.tensor(k))
        self._eval_cache = (self.eval_rank, self.eval_rank._version, k)

    def reset_parameters(self, base: BaseView) -> None:
        init_lora_pair(self.A, self.B)

    # ------------------------------------------------------------------------------------------------ ranks
    def _check(self, k: int) -> int:
        if not 1 <= int(k) <= self.config.r:
            raise ValueError(f"rank must lie in [1, {self.config.r}], got {k}")
        return int(k)

    def set_rank(self, k: int) -> None:
        """Use the rank-``k`` adapter in eval mode, for merging and in mixed batches (saved with the adapter)."""
        k = self._check(k)
        self.eval_rank.fill_(k)
        self._eval_cache = (self.eval_rank, self.eval_rank._version, k)

    @property
    def _eval_k(self) -> int:
        """The eval rank as an int: the cached value while the ``eval_rank`` buffer is the same tensor with the
        same version, else read from it (after loading or ``.to()``)."""
        t = self.eval_rank
        cached, version, k = self._eval_cache
        if t is not cached or t._version != version:
            k = self._check(int(t))
            self._eval_cache = (t, t._version, k)
        return k

    def fit_state(self, state: dict[str, Tensor]) -> None:
        """Files saved before the eval rank was saved have no ``eval_rank``: they load at the config's eval rank
        (as they did then), the buffer staying unsaved for this module."""
        if "eval_rank" not in state:
            self.register_buffer("eval_rank", self.eval_rank, persistent=False)

    def set_train_rank(self, k: int, frozen: bool | None = None) -> None:
        """Train the rank-``k`` adapter (component ``b = k − 1``); ``frozen`` overrides the config's mode."""
        self.train_rank = self._check(k)
        if frozen is not None:
            self.frozen = frozen

    def step(self, global_step: int) -> None:
        """Draw the rank that trains in the next optimizer step, from ``(config.seed or 0, global_step)``.

        ``global_step`` is the number of optimizer steps done: ``step(0)`` (before the first update) draws the
        rank of the first update, ``step(s)`` after the ``s``-th update the rank of update ``s + 1``. Called by
        ``model.step_adapters``; a loop that never calls it trains rank ``r`` only. Does nothing when
        ``config.sample_in_step`` is ``False``."""
        if self.config.sample_in_step:
            g = torch.Generator().manual_seed((self.config.seed or 0) * 1_000_003 + int(global_step))
            self.set_train_rank(int(torch.randint(self.config.r, (1,), generator=g)) + 1)

    def effective_rank(self) -> int:
        """The eval rank (what merging, mixed batches and eval mode use)."""
        return self._eval_k

    @property
    def rank(self) -> int:
        """The rank the next forward uses (``train_rank`` in training mode, else the eval rank)."""
        return self.train_rank if self.training else self._eval_k

    def factors(self, k: int, frozen: bool = False) -> tuple[Tensor, Tensor]:
        """``A[:k]``, ``B[:, :k]``; with ``frozen`` the components ``< k − 1`` are detached."""
        a, b = self.A[:k], self.B[:, :k]
        if frozen and k > 1:
            a = torch.cat([a[: k - 1].detach(), a[k - 1 :]], dim=0)
            b = torch.cat([b[:, : k - 1].detach(), b[:, k - 1 :]], dim=1)
        return a, b

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, base_out: Tensor, base: BaseView) -> Tensor:
        k = self.rank
        a, b = self.factors(k, frozen=self.training and self.frozen)
        hidden = self.dropout(x) @ a.T
        return add_lowrank(base_out, hidden, b, self.alpha / k)

    def delta_weight(self, base: BaseView) -> Tensor:
        k = self._eval_k
        return (self.alpha / k) * (self.B[:, :k] @ self.A[:k])

    def lowrank(self, base: BaseView) -> LowRank:
        k = self._eval_k
        return LowRank(self.A[:k], self.B[:, :k], self.alpha / k)

    @classmethod
    def expected_trainable(cls, base: BaseView, config: DyLoRAConfig) -> int:
        return config.r * (base.in_features + base.out_features)


def _modules(model: nn.Module) -> list[DyLoRA]:
    """The DyLoRA modules of every adapter of ``model``: the helpers below act on all of them at once."""
    found = modules_in_all_adapters(model, DyLoRA)
    if not found:
        raise ValueError("the model holds no DyLoRA adapter")
    return found


def sample_rank(model: nn.Module, generator: torch.Generator | None = None, *, trainable_only: bool = True) -> int:
    """Draw one rank ``k = b + 1``, ``b ~ U{0, …, r−1}``, and make every DyLoRA module of ``model`` train it.

    One draw is shared by all layers (the paper's rule). With ``trainable_only`` only modules whose parameters
    train (the active adapter's) are set; they must share ``r``.

    Returns:
        the drawn rank ``k``.
    """
    modules = _modules(model)
    if trainable_only:
        modules = [m for m in modules if m.A.requires_grad] or modules
    ranks = {m.config.r for m in modules}
    if len(ranks) != 1:
        raise ValueError(f"DyLoRA modules with different r {sorted(ranks)}: sample each adapter separately")
    k = int(torch.randint(ranks.pop(), (1,), generator=generator)) + 1
    for m in modules:
        m.set_train_rank(k)
    return k


def set_rank(model: nn.Module, k: int) -> None:
    """Set the eval rank ``k`` of every DyLoRA module of ``model``."""
    for m in _modules(model):
        m.set_rank(k)
