"""Server-side aggregation of client adapters: plain functions over adapter state dicts.

A state is what :meth:`peftkit.AdaptedModel.adapter_state_dict` gives: ``{"<module path>.<tensor name>":
Tensor}``. LoRA keeps ``A [r, in]`` and ``B [out, r]`` per module (``ΔW = s·B A``), LoRA-SB keeps frozen
``A``, ``B`` and a trained ``R [r, r]`` (``ΔW = s·B R A``); a task head (``modules_to_save``) keeps
``weight_delta`` / ``bias_delta``. Weights ``p_i`` (``Σ p_i = 1``) default to uniform, as in the official
Fed-SB code (``torch.stack(...).mean(0)``); pass the clients' example counts for sample-weighted averaging.

* :func:`fedsb` (Singhal et al., 2025, "Fed-SB: A Silver Bullet for Extreme Communication Efficiency and
  Performance in (Private) Federated LoRA Fine-Tuning"; official code CERT-Lab/fed-sb, ``fed/fed_agg.py``):
  every client shares ``A``, ``B``; the server averages ``R``. Exact, because ``R ↦ B R A`` is linear:
  ``B (Σ p_i R_i) A = Σ p_i B R_i A``.
* :func:`fedavg` (FedIT: Zhang et al., 2024, "Towards Building the Federated GPT: Federated Instruction
  Tuning"): ``A`` and ``B`` averaged separately. Not exact: ``Σ p_i B_i A_i − B̄ Ā = Σ p_i (B_i − B̄)(A_i − Ā)``,
  the cross term, which :func:`cross_term` returns in factored form (rank ≤ c·r) as the error made.
* :func:`ffa` (FFA-LoRA: Sun et al., 2024, "Improving LoRA in Privacy-preserving Federated Learning"): ``A``
  frozen and shared, ``B`` averaged. Exact (``B ↦ B A`` is linear), with half the trainable factors.
* :func:`fedex` (FedEx-LoRA: Singhal et al., 2025, "FedEx-LoRA: Exact Aggregation for Federated and Efficient
  Fine-Tuning of Foundation Models"): ``A`` and ``B`` averaged as in FedAvg and the cross term returned as the
  residual the server folds into the frozen base, so that ``W0 + res + s·B̄ Ā = Σ p_i (W0 + s·B_i A_i)`` exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from peftkit.federated.errors import AdapterMismatchError, FederatedOptionError

State = Mapping[str, Tensor]
Scales = Mapping[str, float] | float

__all__ = [
    "Aggregate",
    "Residual",
    "aggregation_error",
    "average",
    "check_compatible",
    "cross_term",
    "fedavg",
    "fedex",
    "fedsb",
    "ffa",
    "lowrank_paths",
    "normalized_weights",
    "require_identical",
]


@dataclass
class Residual:
    """``up @ down`` (``up [out, m]``, ``down [m, in]``, the scale folded into ``up``): a low-rank update of one
    module's weight, kept factored while that is smaller than the dense ``[out, in]`` matrix."""

    up: Tensor
    down: Tensor

    def dense(self) -> Tensor:
        """The ``[out, in]`` matrix."""
        return self.up @ self.down

    @property
    def factored_numel(self) -> int:
        return self.up.numel() + self.down.numel()

    @property
    def dense_numel(self) -> int:
        return self.up.shape[0] * self.down.shape[1]


@dataclass
class Aggregate:
    """What an aggregation returns.

    Attributes:
        state: the global adapter state (same keys as the clients').
        residual: per module path, ``Σ p_i s·B_i A_i − s·B̄ Ā``: for FedAvg-LoRA the error its aggregate makes
            (reported, not applied), for FedEx-LoRA what the server folds into the frozen base. Empty for Fed-SB
            and FFA-LoRA, which are exact.
    """

    state: dict[str, Tensor]
    residual: dict[str, Residual] = field(default_factory=dict)


def normalized_weights(count: int, weights: Sequence[float] | None = None) -> list[float]:
    """``p_i`` summing to one: uniform when ``weights`` is ``None``, else ``weights`` divided by their sum.

    Raises:
        FederatedOptionError: a weight count that differs from the client count, a negative or non-finite
            weight, or weights that sum to zero.
    """
    if count < 1:
        raise FederatedOptionError("aggregation needs at least one client state")
    if weights is None:
        return [1.0 / count] * count
    values = [float(w) for w in weights]
    if len(values) != count:
        raise FederatedOptionError(f"got {len(values)} weights for {count} client states")
    if any(not math.isfinite(w) or w < 0 for w in values) or sum(values) <= 0:
        raise FederatedOptionError(f"client weights must be finite, non-negative and not all zero, got {values}")
    total = sum(values)
    return [w / total for w in values]


def _module(key: str) -> tuple[str, str]:
    path, _, name = key.rpartition(".")
    return path, name


def check_compatible(states: Sequence[State]) -> None:
    """Every client state must hold the same tensors with the same shapes (same method, targets and ranks).

    Raises:
        AdapterMismatchError: naming the first client that differs from client 0 and how (modules it adapts or
            lacks, or the rank / shape of a tensor).
    """
    if not states:
        raise FederatedOptionError("aggregation needs at least one client state")
    ref = states[0]
    ref_modules = {_module(k)[0] for k in ref}
    for i, state in enumerate(states[1:], start=1):
        modules = {_module(k)[0] for k in state}
        if modules != ref_modules:
            extra, missing = sorted(modules - ref_modules), sorted(ref_modules - modules)
            raise AdapterMismatchError(
                f"client {i} adapts other modules than client 0 (targets differ): it adds {extra[:3]} and lacks "
                f"{missing[:3]}"
            )
        if set(state) != set(ref):
            diff = sorted(set(state) ^ set(ref))
            raise AdapterMismatchError(f"client {i} holds other tensors than client 0 (method differs): {diff[:3]}")
        for key, tensor in state.items():
            if tensor.shape != ref[key].shape:
                got, want = tuple(tensor.shape), tuple(ref[key].shape)
                what = "rank" if _module(key)[1] in ("A", "B", "R") else "shape"
                raise AdapterMismatchError(
                    f"client {i}'s {key!r} has shape {got}, client 0's {want}: the adapters differ in {what}"
                )


def require_identical(states: Sequence[State], names: Iterable[str], strategy: str) -> None:
    """The tensors named ``names`` (``"A"``, ``"B"``) must be bitwise equal on every client: the strategy
    ``strategy`` shares them (set once by the server), and its exactness rests on that.

    Raises:
        AdapterMismatchError: naming the client and tensor that differ.
    """
    wanted = set(names)
    for key, ref in states[0].items():
        if _module(key)[1] not in wanted:
            continue
        for i, state in enumerate(states[1:], start=1):
            if not torch.equal(state[key], ref):
                raise AdapterMismatchError(
                    f"{strategy} needs the same frozen {_module(key)[1]} on every client, but client {i}'s {key!r} "
                    "differs from client 0's (were the clients set up from one initialisation?)"
                )


def average(states: Sequence[State], weights: Sequence[float] | None = None, keys: Iterable[str] | None = None,
            ) -> dict[str, Tensor]:  # fmt: skip
    """``Σ_i p_i · state_i[key]`` for every key (or ``keys``), accumulated in float64 and cast back."""
    check_compatible(states)
    p = normalized_weights(len(states), weights)
    out: dict[str, Tensor] = {}
    for key in keys if keys is not None else states[0]:
        total = sum(w * s[key].double() for w, s in zip(p, states))
        out[key] = total.to(states[0][key].dtype)  # type: ignore[union-attr]
    return out


def lowrank_paths(state: State) -> list[str]:
    """Module paths with LoRA factors ``A`` and ``B`` in ``state``, in key order."""
    seen: dict[str, set[str]] = {}
    for key in state:
        path, name = _module(key)
        seen.setdefault(path, set()).add(name)
    return [path for path, names in seen.items() if {"A", "B"} <= names]


def _scale(scales: Scales, path: str) -> float:
    if isinstance(scales, Mapping):
        if path not in scales:
            raise FederatedOptionError(f"no scale given for module {path!r}")
        return float(scales[path])
    return float(scales)


def cross_term(states: Sequence[State], weights: Sequence[float] | None = None, scales: Scales = 1.0,
               ) -> dict[str, Residual]:  # fmt: skip
    """Per LoRA module, ``Σ p_i s·B_i A_i − s·B̄ Ā = Σ p_i s·(B_i − B̄)(A_i − Ā)`` as factors
    ``up = [√p_i s (B_i − B̄)]_i`` (``[out, c·r]``) and ``down = [√p_i (A_i − Ā)]_i`` (``[c·r, in]``), float32.
    ``scales``: ``s`` per module path, or one value for all."""
    check_compatible(states)
    p = normalized_weights(len(states), weights)
    out = {}
    for path in lowrank_paths(states[0]):
        a = [s[f"{path}.A"].double().flatten(1) for s in states]
        b = [s[f"{path}.B"].double() for s in states]
        a_mean = sum(w * x for w, x in zip(p, a))
        b_mean = sum(w * x for w, x in zip(p, b))
        s = _scale(scales, path)
        up = torch.cat([math.sqrt(w) * s * (x - b_mean) for w, x in zip(p, b)], dim=1)
        down = torch.cat([math.sqrt(w) * (x - a_mean) for w, x in zip(p, a)], dim=0)
        out[path] = Residual(up.float(), down.float())
    return out


def fedsb(states: Sequence[State], weights: Sequence[float] | None = None) -> Aggregate:
    """Fed-SB: ``A``, ``B`` shared (checked), ``R`` and every other tensor (a head) averaged. Exact."""
    check_compatible(states)
    require_identical(states, ("A", "B"), "Fed-SB")
    return Aggregate(average(states, weights))


def fedavg(states: Sequence[State], weights: Sequence[float] | None = None, scales: Scales = 1.0) -> Aggregate:
    """FedAvg-LoRA (FedIT): every tensor averaged, ``A`` and ``B`` separately; ``residual`` is the error this makes
    (the cross term, see :func:`cross_term`)."""
    return Aggregate(average(states, weights), cross_term(states, weights, scales))


def ffa(states: Sequence[State], weights: Sequence[float] | None = None) -> Aggregate:
    """FFA-LoRA: ``A`` shared (checked), ``B`` and every other tensor averaged. Exact."""
    check_compatible(states)
    require_identical(states, ("A",), "FFA-LoRA")
    return Aggregate(average(states, weights))


def fedex(states: Sequence[State], weights: Sequence[float] | None = None, scales: Scales = 1.0) -> Aggregate:
    """FedEx-LoRA: ``A`` and ``B`` averaged, and the cross term returned as the residual to fold into the frozen
    base weight; base + residual + ``s·B̄ Ā`` is exactly the weighted average of the clients' adapted weights."""
    return fedavg(states, weights, scales)


def aggregation_error(states: Sequence[State], weights: Sequence[float] | None, residual: Mapping[str, Residual],
                      scales: Scales = 1.0) -> float:  # fmt: skip
    """``‖residual‖ / ‖Σ p_i s·B_i A_i‖`` (Frobenius norms over the residual's modules): the relative error of an
    aggregate that drops ``residual`` (FedAvg-LoRA's, or what FedEx-LoRA folds into the base)."""
    p = normalized_weights(len(states), weights)
    error = exact = 0.0
    for path, res in residual.items():
        s = _scale(scales, path)
        mean = sum(w * s * st[f"{path}.B"].double() @ st[f"{path}.A"].double().flatten(1) for w, st in zip(p, states))
        exact += float(mean.norm() ** 2)  # type: ignore[union-attr]
        error += float(res.dense().double().norm() ** 2)
    return math.sqrt(error) / max(math.sqrt(exact), 1e-30)
