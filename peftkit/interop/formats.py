"""The PEFT format table: how each peftkit method is written as one Hugging Face PEFT tuner (data only).

One :class:`PeftFormat` entry per method in :data:`PEFT_FORMATS`; the export and import flows in
:mod:`peftkit.interop.convert` are the same for every entry, and what differs between PEFT tuners is a field
of the entry (names, config fields, fixed values, refused options) or, where it is a computation, a small hook
in it (PEFT's LoRA conv check, RandLoRA's shared-basis shape, the dense ``modules_to_save`` values).

Mapping (peftkit -> PEFT):

* LoRA / rsLoRA (``lora``): ``A -> lora_A.weight``, ``B -> lora_B.weight``, ``bias -> lora_B.bias``
  (``lora_bias=True``); on embeddings ``A -> lora_embedding_A``, ``B -> lora_embedding_B``. Conv2d: PEFT
  keeps ``B`` as a 1x1 conv weight ``[out, r, 1, 1]``. Residual inits (PiSSA, LoRA-GA, LoKU) export as the
  plain LoRA of rank ``2r`` the method's ``export_config`` / ``export_state`` hooks give.
* DoRA (``dora``, ``use_dora=True``): LoRA's tensors plus ``magnitude -> lora_magnitude_vector`` (``[out]``;
  ``[1, out, 1, 1]`` on Conv2d).
* ``modules_to_save`` (the dense ``full`` adapter, :data:`DENSE`): PEFT stores the whole trained module, so
  the export writes ``W + ΔW`` and ``b + Δb`` in the module's own layout, and the import takes ``W_saved − W``.
* SHiRA, RandLoRA, FourierFT, MiSS / Bone (MiSS's ``bat`` mode; PEFT dropped ``BoneConfig``), LoKr, LoHa.

GPT-2 ``Conv1D``: PEFT's ``lora_A``/``lora_B`` are ``[r, in]``/``[out, r]`` for Conv1D too (``nn.Linear``
modules); ``fan_in_fan_out`` only tells PEFT to transpose ``W`` when merging. So no tensor is transposed, and
PEFT corrects its global flag per layer, so Linear and Conv1D targets mix in one adapter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from peftkit.core.base import BaseView
from peftkit.core.errors import AdapterFileError, BaseModelMismatch

__all__ = ["DENSE", "PEFT_FORMATS", "PREFIX", "PeftFormat", "format_kind"]

#: Prefix of every key in a PEFT ``adapter_model.safetensors`` (``base_model.model.<module path>.<suffix>``).
PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class PeftFormat:
    """How one peftkit method is written as one PEFT tuner (data; the flows are shared by all entries).

    Attributes:
        peft_type: PEFT's ``peft_type``; ``None`` for the dense adapter, which PEFT has only as
            ``modules_to_save`` of another tuner.
        tensors: layer kind (:func:`format_kind`: ``"linear"``, ``"conv1d"`` for GPT-2's Conv1D, ``"conv2d"``,
            ``"embedding"``) -> our saved tensor -> PEFT key suffix. A kind missing here is not expressible.
        fields: our config field -> PEFT config field holding the same value.
        values: our config field -> (PEFT field, {our value: PEFT value}, {extra PEFT value: our value}); the
            import reads the inverse of the first map plus the second.
        fixed: PEFT config fields written with a fixed value.
        select: PEFT flags that tell entries of one ``peft_type`` apart (LoRA / DoRA: ``use_dora``); written
            on export, matched on import (a missing flag counts as ``False``).
        ignored: our config fields that do not change a trained adapter (what the frozen-tensor check verifies
            instead; the init, seed and targets are never compared).
        frozen: PEFT suffix of a saved frozen tensor -> our unsaved buffer it must begin with (import check).
        required: PEFT field -> (the values peftkit imports, why others are refused).
        fan_in_fan_out: PEFT needs ``fan_in_fan_out=True`` when a GPT-2 Conv1D is targeted.
        implied: our config fields that PEFT derives from all adapted layers at once (RandLoRA's shared bases).
        patterns: our config field -> PEFT's per-module pattern field (``rank_pattern``), read with PEFT's
            ``get_pattern_key``; our per-module ``overrides`` of that field are written there. Overrides of any
            other field are not expressible.
        singletons: (kind, our tensor) -> (leading, trailing) size-1 dims PEFT's copy has in addition.
        aliases: key suffixes older PEFT versions wrote -> the suffix they mean.
        check_base: why PEFT's tuner would compute something else on this layer (``None``: it would not).
        to_peft: our tensors -> the values PEFT stores under their names (default: the same values).
        from_peft: the inverse (PEFT's values under our names -> our tensors; may raise
            :class:`BaseModelMismatch`).
        adjust: last fix-ups of the written PEFT config (settings PEFT's own config validation refuses).
    """

    peft_type: str | None
    tensors: dict[str, dict[str, str]]
    fields: dict[str, str] = dataclasses.field(default_factory=dict)
    values: dict[str, tuple[str, dict[Any, Any], dict[Any, Any]]] = dataclasses.field(default_factory=dict)
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)
    select: dict[str, bool] = dataclasses.field(default_factory=dict)
    ignored: frozenset[str] = frozenset()
    frozen: dict[str, str] = dataclasses.field(default_factory=dict)
    required: dict[str, tuple[tuple[Any, ...], str]] = dataclasses.field(default_factory=dict)
    fan_in_fan_out: bool = False
    implied: Callable[[list[BaseView]], dict[str, Any]] | None = None
    patterns: dict[str, str] = dataclasses.field(default_factory=dict)
    singletons: dict[tuple[str, str], tuple[int, int]] = dataclasses.field(default_factory=dict)
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    check_base: Callable[[BaseView], str | None] | None = None
    to_peft: Callable[[BaseView, dict[str, Tensor]], dict[str, Tensor]] | None = None
    from_peft: Callable[[BaseView, dict[str, Tensor], str], dict[str, Tensor]] | None = None
    adjust: Callable[[dict[str, Any]], None] | None = None

    def suffixes(self) -> set[str]:
        """Every PEFT key suffix this tuner writes or reads (aliases and saved frozen tensors included)."""
        return {s for names in self.tensors.values() for s in names.values()} | set(self.aliases) | set(self.frozen)

    def matches(self, raw: dict[str, Any]) -> bool:
        """Whether a PEFT ``adapter_config.json`` (``raw``) is this tuner."""
        return raw.get("peft_type") == self.peft_type and all(bool(raw.get(k)) == v for k, v in self.select.items())


def format_kind(base: BaseView) -> str:
    """The layer kind the table is keyed by: our kind, with GPT-2's Conv1D apart from ``nn.Linear``."""
    return "conv1d" if base.kind == "linear" and base.transposed else base.kind


# ------------------------------------------------------------------------------------------------ LoRA, DoRA
_LORA = {"A": "lora_A.weight", "B": "lora_B.weight", "bias": "lora_B.bias"}
_LORA_TENSORS = {
    "linear": _LORA,
    "conv1d": _LORA,
    "conv2d": _LORA,
    "embedding": {"A": "lora_embedding_A", "B": "lora_embedding_B"},
}
# PEFT initialisations after which the saved tensors are a plain LoRA of the untouched base.
_PLAIN_INITS = (None, True, False, "gaussian", "eva", "orthogonal", "mica")
_OFF = (None, False, [], {})
# LoraConfig options with no peftkit equivalent: (values peftkit imports, why others are refused).
_LORA_REQUIRED: dict[str, tuple[tuple[Any, ...], str]] = {
    "bias": (("none", None), "it trains the base biases (only bias='none' is)"),
    "init_lora_weights": (
        _PLAIN_INITS,
        "it rewrites the base weights, so the saved tensors do not apply to the untouched base; convert it to "
        "plain LoRA in PEFT (path_initial_model_for_weight_conversion)",
    ),
    "layer_replication": (_OFF, "it duplicates base layers"),
    "target_parameters": (_OFF, "it adapts raw nn.Parameters"),
    "trainable_token_indices": (_OFF, "it trains embedding rows (TrainableTokens)"),
    "alora_invocation_tokens": (_OFF, "aLoRA activates the adapter per token"),
    "use_qalora": (_OFF, "QALoRA pools the input"),
    "use_bdlora": (_OFF, "BD-LoRA uses block-diagonal factors"),
    "arrow_config": (_OFF, "Arrow routes between adapters"),
    "monteclora_config": (_OFF, "MonteCLoRA samples its factors"),
    "velora_config": (_OFF, "VeLoRA changes the backward pass"),
    "kasa_config": (_OFF, "KaSA changes the forward"),
    "megatron_config": (_OFF, "Megatron parallel layers are not supported"),
}


def _lora_conv(base: BaseView) -> str | None:
    """PEFT's LoRA conv uses the base kernel, stride and padding but not dilation or padding mode."""
    m = base.module
    if base.kind != "conv2d" or (
        all(d == 1 for d in m.dilation) and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    ):
        return None
    return (
        f"PEFT's LoRA for Conv2d ignores dilation={m.dilation}, padding={m.padding!r} and "
        f"padding_mode={m.padding_mode!r}, so it would compute something else"
    )


def _lora_bias_init(peft_config: dict[str, Any]) -> None:
    """The init is only a record here (the tensors are trained); PEFT refuses ``"gaussian"`` with ``lora_bias``."""
    if peft_config["lora_bias"]:
        peft_config["init_lora_weights"] = True


def _lora(use_dora: bool) -> PeftFormat:
    tensors = _LORA_TENSORS
    if use_dora:  # (PEFT's DoRA adapts embeddings, ours does not: DoRA.supports refuses them on import)
        tensors = {k: {**v, "magnitude": "lora_magnitude_vector"} for k, v in tensors.items()}
    return PeftFormat(
        "LORA",
        tensors,
        fields={
            "r": "r",
            "alpha": "lora_alpha",
            "dropout": "lora_dropout",
            "rslora": "use_rslora",
            "bias": "lora_bias",
        },
        values={
            "init": (
                "init_lora_weights",
                {"kaiming": True, "gaussian": "gaussian"},
                {False: "kaiming", "eva": "kaiming", "orthogonal": "kaiming", "mica": "kaiming"},
            )
        },
        fixed={"bias": "none", "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None},
        select={"use_dora": use_dora},
        required=_LORA_REQUIRED,
        fan_in_fan_out=True,
        patterns={"r": "rank_pattern", "alpha": "alpha_pattern"},
        singletons={("conv2d", "B"): (0, 2), ("conv2d", "magnitude"): (1, 2)},
        aliases={"lora_magnitude_vector.weight": "lora_magnitude_vector"} if use_dora else {},
        check_base=_lora_conv,
        adjust=_lora_bias_init,
    )


# ---------------------------------------------------------------------------- modules_to_save (dense adapter)
def _stored(base: BaseView, canonical: Tensor) -> Tensor:
    return canonical.T if base.transposed else canonical


def _dense_to_peft(base: BaseView, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The whole module as PEFT's ``modules_to_save`` holds it: ``W + ΔW`` (module layout) and ``b + Δb``."""
    with torch.no_grad():
        out = {"weight_delta": _stored(base, base.weight + state["weight_delta"].to(base.dtype))}
        if base.bias is not None:
            delta = state.get("bias_delta")
            out["bias_delta"] = base.bias if delta is None else base.bias + delta.to(base.bias.dtype)
    return out


def _dense_from_peft(base: BaseView, parts: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """``ΔW = W_saved − W`` (canonical layout), ``Δb = b_saved − b``, from the whole saved module."""
    expected = {"weight_delta"} | ({"bias_delta"} if base.bias is not None else set())
    if set(parts) != expected:
        names = {"weight_delta": "weight", "bias_delta": "bias"}
        raise AdapterFileError(
            f"{where}: the saved module has tensors {sorted(names[n] for n in parts)}; this model's has "
            f"{sorted(names[n] for n in expected)}"
        )
    weight = parts["weight_delta"]
    if tuple(weight.shape) != tuple(base.module.weight.shape):
        raise BaseModelMismatch(
            f"{where}.weight has shape {tuple(weight.shape)}; this model's is {tuple(base.module.weight.shape)}"
        )
    with torch.no_grad():
        state = {"weight_delta": _stored(base, weight).float() - base.weight.float()}
        if "bias_delta" in parts:
            state["bias_delta"] = parts["bias_delta"].float() - base.bias.float()
    return state


_DENSE_NAMES = {"weight_delta": "weight", "bias_delta": "bias"}
#: The dense ``full`` adapter, which PEFT holds only as a tuner's ``modules_to_save`` (the module's own names).
DENSE = PeftFormat(
    None,
    {kind: _DENSE_NAMES for kind in ("linear", "conv1d", "conv2d", "embedding")},
    to_peft=_dense_to_peft,
    from_peft=_dense_from_peft,
)


# ------------------------------------------------------------------------------------------ the other tuners
def _lycoris(prefix: str, names: tuple[str, ...]) -> dict[str, dict[str, str]]:
    return {kind: {n: prefix + n for n in names} for kind in ("linear", "conv2d")}


def _randlora_projection(views: list[BaseView]) -> dict[str, Any]:
    """PEFT sizes RandLoRA's shared bases by the elementwise max of the adapted layers' ``(out, in)``."""
    return {"projection_shape": [max(v.out_features for v in views), max(v.in_features for v in views)]}


_RANK_ALPHA_PATTERNS = {"r": "rank_pattern", "alpha": "alpha_pattern"}
_INIT_TRUE_FALSE = {"zeros": True, "randn": False}
_BIAS_NONE = {"bias": (("none", None), "it trains the base biases (only bias='none' is)")}

#: method -> its PEFT tuner (``"full"``: the dense adapter, exported only as ``modules_to_save``).
PEFT_FORMATS: dict[str, PeftFormat] = {
    "lora": _lora(use_dora=False),
    "dora": _lora(use_dora=True),
    "full": DENSE,
    "shira": PeftFormat(
        "SHIRA",
        {"linear": {"values": "shira_weight", "indices": "shira_indices"}},
        fields={"r": "r", "random_seed": "random_seed"},
        values={"init": ("init_weights", _INIT_TRUE_FALSE, {})},
        fixed={"mask_type": "random"},  # PEFT loads the saved shira_indices, so any of our masks is expressible
        ignored=frozenset({"mask_type"}),
    ),
    "randlora": PeftFormat(
        "RANDLORA",
        {kind: {"lam": "randlora_lambda", "gamma": "randlora_gamma"} for kind in ("linear", "conv1d")},
        fields={
            "r": "r",
            "alpha": "randlora_alpha",
            "dropout": "randlora_dropout",
            "projection_prng_key": "projection_prng_key",
            "sparse": "sparse",
            "very_sparse": "very_sparse",
        },
        fixed={"save_projection": False, "bias": "none"},  # bases regenerated from the key, never saved
        ignored=frozenset({"projection_shape"}),
        frozen={"randlora_A": "A", "randlora_B": "B"},
        required=_BIAS_NONE,
        fan_in_fan_out=True,
        implied=_randlora_projection,
    ),
    "fourierft": PeftFormat(
        "FOURIERFT",
        {kind: {"spectrum": "fourierft_spectrum"} for kind in ("linear", "conv1d")},
        fields={"n_frequency": "n_frequency", "scaling": "scaling", "random_loc_seed": "random_loc_seed"},
        values={"init": ("init_weights", _INIT_TRUE_FALSE, {})},
        fixed={"n_frequency_pattern": {}, "bias": "none"},
        required={"n_frequency_pattern": (({}, None), "it varies n_frequency per module"), **_BIAS_NONE},
        fan_in_fan_out=True,
    ),
    "miss": PeftFormat(  # Bone is MiSS's "bat" mode (PEFT removed BoneConfig in favour of MissConfig)
        "MISS",
        {"linear": {"block": "miss_block"}},
        fields={"r": "r", "mini_r": "mini_r", "dropout": "miss_dropout"},
        # PEFT's init_weights picks the mode (False: the default mode with a random init)
        values={"mode": ("init_weights", {"miss": True, "mini": "mini", "bat": "bat"}, {False: "miss"})},
        fixed={"bias": "none"},
        ignored=frozenset({"init"}),
        required=_BIAS_NONE,
    ),
    "lokr": PeftFormat(
        "LOKR",
        _lycoris("lokr_", ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")),
        fields={
            f: f
            for f in (
                "r",
                "alpha",
                "decompose_factor",
                "decompose_both",
                "use_effective_conv2d",
                "rank_dropout",
                "rank_dropout_scale",
                "module_dropout",
            )
        },
        values={"init": ("init_weights", {"peft": True, "lycoris": "lycoris", "random": False}, {})},
        patterns=_RANK_ALPHA_PATTERNS,
    ),
    "loha": PeftFormat(
        "LOHA",
        _lycoris("hada_", ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")),
        fields={f: f for f in ("r", "alpha", "use_effective_conv2d", "rank_dropout", "module_dropout")},
        values={"init": ("init_weights", {"peft": True, "random": False}, {})},
        patterns=_RANK_ALPHA_PATTERNS,
    ),
}
