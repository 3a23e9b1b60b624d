"""Hugging Face PEFT folders: export and import (the format only; the ``peft`` library is not needed).

A PEFT LoRA folder holds ``adapter_config.json`` (a ``LoraConfig``) and ``adapter_model.safetensors`` with
keys ``base_model.model.<module path>.<suffix>``. Which of our tensors becomes which PEFT key is data, in
:data:`TENSOR_NAMES` (per method and base-layer kind) and :data:`CONFIG_FIELDS`; nothing here special-cases
a method beyond those tables.

Mapping (peftkit -> PEFT):

* LoRA / rsLoRA (``lora``): ``A -> lora_A.weight``, ``B -> lora_B.weight``, ``bias -> lora_B.bias``
  (``lora_bias=True``); on embeddings ``A -> lora_embedding_A``, ``B -> lora_embedding_B``. Conv2d: PEFT
  keeps ``B`` as a 1x1 conv weight ``[out, r, 1, 1]``.
* DoRA (``dora``, ``use_dora=True``): LoRA's tensors plus ``magnitude -> lora_magnitude_vector`` (``[out]``;
  ``[1, out, 1, 1]`` on Conv2d).
* ``modules_to_save`` (our dense ``full`` adapter): PEFT stores the whole trained module, so the export
  writes ``W + ΔW`` and ``b + Δb`` in the module's own layout, and the import takes ``W_saved − W``.
* SHiRA, RandLoRA, FourierFT, MiSS / Bone (MiSS's ``bat`` mode; PEFT dropped ``BoneConfig``), LoKr, LoHa: one
  :class:`PeftFormat` entry each in :data:`PEFT_FORMATS` (PEFT type, tensor names, config fields). Export
  reads the folder's config back as PEFT will and refuses (``ExportError`` naming the field) any setting it
  does not carry (SHiRA ``scale``, RandLoRA ``scale_by_sqrt_bases``) and any frozen tensor PEFT would rebuild
  differently (RandLoRA's bases: PEFT shares one set sized by the elementwise max of the adapted layers, so
  ``projection_shape`` must be that max unless all layers have one shape). Frozen tensors rebuilt from a seed
  are never written (RandLoRA ``save_projection=False``; FourierFT's locations); SHiRA's indices are (PEFT
  reads ``shira_indices`` back, so every SHiRA mask exports). Import checks saved bases against the rebuilt ones.

Design decisions:

* GPT-2 ``Conv1D``: PEFT's ``lora_A``/``lora_B`` are ``[r, in]``/``[out, r]`` for Conv1D too (they are
  ``nn.Linear`` modules); ``fan_in_fan_out`` only tells PEFT to transpose ``W`` when merging and in DoRA's
  norm. So no tensor is transposed. PEFT's flag is global, but PEFT corrects it per layer when it builds the
  layers (``True`` for Conv1D, ``False`` for ``nn.Linear``, with a warning), so an adapter mixing Linear and
  Conv1D targets loads correctly: we write ``fan_in_fan_out=True`` whenever a Conv1D is targeted.
* Targets are written as the explicit list of module paths, and on import the adapted modules are read from
  the tensor keys, not re-derived from ``target_modules``. PEFT's ``layers_to_transform``, ``layers_pattern``
  and ``exclude_modules`` therefore import correctly (the keys already say which layers were adapted).
* Per-module ranks and alphas: PEFT's ``rank_pattern`` / ``alpha_pattern`` <-> our config ``overrides``
  (``{module path: {"r": ..., "alpha": ...}}``). Export writes one escaped full-path pattern per module whose
  rank or alpha differs; import writes an override for every module that differs from the most common pair.
  Overrides of any other field have no PEFT equivalent (:class:`ExportError`).
* Refused with a clear error: other ``peft_type`` s, ``bias != "none"``, initialisations that rewrite the
  base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA: convert them to plain LoRA in PEFT first), LoRA variants
  with their own forward (aLoRA, QALoRA, BD-LoRA, Arrow, MonteCLoRA, VeLoRA, KaSA), ``target_parameters``,
  ``trainable_token_indices``, ``layer_replication``, dilated or non-zero-padded Conv2d (PEFT's LoRA conv
  ignores dilation and padding mode), pickle-only folders (``adapter_model.bin``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from peftkit.core import inject
from peftkit.core.base import BaseView, layer_kind
from peftkit.core.dense import Full
from peftkit.core.errors import (
    AdapterFileError,
    BaseModelMismatch,
    ExportError,
    InvalidConfigError,
    TargetModuleError,
    UnsupportedAdapterError,
)
from peftkit.core.io import safetensors_bytes, write_files
from peftkit.core.model import AdaptedModel, restore_grad_flags_on_error
from peftkit.core.protocol import skip_init
from peftkit.core.registry import get_method

__all__ = [
    "CONFIG_FIELDS",
    "PEFT_CONFIG_FILE",
    "PEFT_FORMATS",
    "PEFT_WEIGHTS_FILE",
    "TENSOR_NAMES",
    "PeftFormat",
    "export_peft",
    "import_peft",
]

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."

# ------------------------------------------------------------------------------------------------ the tables
_LORA_NAMES = {
    "linear": {"A": "lora_A.weight", "B": "lora_B.weight", "bias": "lora_B.bias"},
    "conv2d": {"A": "lora_A.weight", "B": "lora_B.weight", "bias": "lora_B.bias"},
    "embedding": {"A": "lora_embedding_A", "B": "lora_embedding_B"},
}
#: method -> base-layer kind -> our tensor name -> PEFT key suffix. A kind missing here is not expressible.
TENSOR_NAMES: dict[str, dict[str, dict[str, str]]] = {
    "lora": _LORA_NAMES,
    "dora": {kind: {**names, "magnitude": "lora_magnitude_vector"} for kind, names in _LORA_NAMES.items()},
}
#: PEFT's shape of one of our tensors, where it differs (same numbers, extra singleton dims).
_PEFT_SHAPE: dict[tuple[str, str], Callable[[tuple[int, ...]], tuple[int, ...]]] = {
    ("conv2d", "B"): lambda s: (*s, 1, 1),
    ("conv2d", "magnitude"): lambda s: (1, *s, 1, 1),
}
#: Key suffixes older PEFT versions wrote, and the suffix they mean.
_ALIASES = {"lora_magnitude_vector.weight": "lora_magnitude_vector"}
#: method -> PEFT's ``use_dora``.
_USE_DORA = {"lora": False, "dora": True}
#: our config field -> PEFT ``LoraConfig`` field (same meaning, same value).
CONFIG_FIELDS = {
    "r": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "rslora": "use_rslora",
    "bias": "lora_bias",
}
# Our fields that need no PEFT counterpart (written another way, or irrelevant to a trained adapter).
_OTHER_FIELDS = {"targets", "exclude", "modules_to_save", "seed", "init", "overrides"}
# Config fields PEFT can set per module, and the pattern dict that carries each.
_PATTERNS = {"r": "rank_pattern", "alpha": "alpha_pattern"}
# Our dense adapter's tensors -> the module's own parameter names (PEFT saves the whole module).
_DENSE_NAMES = {"weight_delta": "weight", "bias_delta": "bias"}

# PEFT initialisations after which the saved tensors are a plain LoRA of the untouched base.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
# LoraConfig options that change the forward or the base and have no peftkit equivalent: field -> why.
_REFUSED_OPTIONS = {
    "layer_replication": "it duplicates base layers",
    "target_parameters": "it adapts raw nn.Parameters",
    "trainable_token_indices": "it trains embedding rows (TrainableTokens)",
    "alora_invocation_tokens": "aLoRA activates the adapter per token",
    "use_qalora": "QALoRA pools the input",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "arrow_config": "Arrow routes between adapters",
    "monteclora_config": "MonteCLoRA samples its factors",
    "velora_config": "VeLoRA changes the backward pass",
    "kasa_config": "KaSA changes the forward",
    "megatron_config": "Megatron parallel layers are not supported",
}


# ---------------------------------------------------------------------------------------------------- export
def export_peft(
    model: AdaptedModel, path: str | Path, adapter: str | None = None, *, task_type: str | None = None
) -> Path:
    """Write one adapter as a Hugging Face PEFT LoRA folder that ``peft.PeftModel.from_pretrained`` loads.

    Args:
        model: the adapted model.
        path: the folder to write (replaced atomically if it exists).
        adapter: the adapter to export (default: the single active one).
        task_type: PEFT ``task_type`` to record (e.g. ``"SEQ_CLS"``); ``None`` loads as a plain ``PeftModel``.

    Returns:
        The folder written.

    Raises:
        ExportError: the method (or one of its settings, or a targeted layer) has no PEFT equivalent, or the
            adapter's layers are merged (unmerge first: PEFT applies the adapter to the unmerged base).
    """
    name = adapter or model._single_active()
    model.require(name)
    config = model.configs[name]
    method = type(config).method
    if method in PEFT_FORMATS:
        return _export_format(model, name, config, PEFT_FORMATS[method], Path(path), task_type)
    if method not in TENSOR_NAMES:
        raise ExportError(
            f"adapter {name!r} uses method {method!r}, which has no Hugging Face PEFT equivalent; "
            f"PEFT folders hold {sorted([*TENSOR_NAMES, *PEFT_FORMATS])} adapters (plus modules_to_save)"
        )
    _check_fields(config)
    tensors: dict[str, Tensor] = {}
    patterns: dict[str, dict[str, Any]] = {peft: {} for peft in _PATTERNS.values()}
    targets: list[str] = []
    saved: list[str] = []
    conv1d = False
    for module_path, module, base in _exported_modules(model, name, tensors, saved):
        names = TENSOR_NAMES[method].get(base.kind)
        if names is None or module.method != method:
            raise ExportError(f"{module_path!r}: PEFT has no {method!r} adapter for a {base.describe()['type']}")
        _check_peft_conv(base, module_path, ExportError)
        for ours, t in _lora_state(module).items():
            if ours not in names:
                raise ExportError(f"{module_path!r}: tensor {ours!r} of method {method!r} has no PEFT equivalent")
            shape = _PEFT_SHAPE.get((base.kind, ours), tuple)(tuple(t.shape))
            tensors[f"{PREFIX}{module_path}.{names[ours]}"] = t.detach().reshape(shape).contiguous().cpu()
        targets.append(module_path)
        for peft, value, default in zip(_PATTERNS.values(), _peft_r_alpha(module.config), _peft_r_alpha(config)):
            if value != default:
                patterns[peft][re.escape(module_path)] = _peft_number(value)
        conv1d |= base.kind == "linear" and base.transposed
    if not targets:
        raise ExportError(f"adapter {name!r} adapts no module with {method!r} (only modules_to_save): PEFT needs one")
    fields = {peft: getattr(config, ours) for ours, peft in CONFIG_FIELDS.items()}
    fields["r"], alpha = _peft_r_alpha(config)
    fields["lora_alpha"] = _peft_number(alpha)
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": getattr(getattr(model.model, "config", None), "name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        **fields,
        "use_dora": _USE_DORA[method],
        "bias": "none",
        "fan_in_fan_out": conv1d,
        "target_modules": sorted(targets),
        "exclude_modules": None,
        "modules_to_save": sorted(saved) or None,
        # the init is only a record here (the tensors are trained); PEFT refuses "gaussian" with lora_bias
        "init_lora_weights": "gaussian" if config.init == "gaussian" and not config.bias else True,
        "layers_to_transform": None,
        "layers_pattern": None,
        **patterns,
    }

    return _write_peft_folder(path, peft_config, tensors)


def _write_peft_folder(path: str | Path, peft_config: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """Write a PEFT folder: only its two files, each replaced atomically, the tensors first (so a kill in
    between leaves the old config, never a config without its tensors); other files in ``path`` stay."""
    from peftkit.core.version import __version__

    weights = safetensors_bytes(tensors, {"format": "pt", "exported_by": f"peftkit {__version__}"})
    config = json.dumps(peft_config, indent=2, sort_keys=True).encode()
    return write_files(path, [(PEFT_WEIGHTS_FILE, weights), (PEFT_CONFIG_FILE, config)])


def _lora_state(module: nn.Module) -> dict[str, Tensor]:
    """The tensors to export. A LoRA with a residual offset (PiSSA / LoRA-GA / LoKU inits, ``ΔW = s(BA −
    B₀A₀)``, base untouched) is the plain LoRA of rank ``2r`` with ``A = [A; A₀]``, ``B = [B, −B₀]``."""
    state = module.state_dict()
    if getattr(module, "residual", False):
        down, up = module.factors()
        state = {**{k: v for k, v in state.items() if k not in ("A0", "B0")}, "A": down, "B": up}
    return state


def _peft_r_alpha(config: Any) -> tuple[int, float]:
    """PEFT's ``r`` and ``lora_alpha`` for a module's config: a residual init exports rank ``2r`` with the alpha
    that keeps PEFT's scale equal to ours (``2α / 2r``; rsLoRA ``√2·α / √(2r)``)."""
    if not getattr(config, "residual", False):
        return config.r, config.alpha
    return 2 * config.r, config.alpha * (math.sqrt(2.0) if config.rslora else 2.0)


def _peft_number(value: float) -> int | float:
    """PEFT writes integral alphas as ints."""
    return int(value) if float(value).is_integer() else float(value)


def _exported_modules(
    model: AdaptedModel, name: str, tensors: dict[str, Tensor], saved: list[str]
) -> Iterator[tuple[str, Any, BaseView]]:
    """``(path, adapter module, base view)`` of the method's modules; refuses merged layers. The adapter's
    ``modules_to_save`` (dense) modules are written to ``tensors`` / ``saved`` here, as PEFT saves them."""
    for module_path, module in model.adapter_modules(name).items():
        layer = model.model.get_submodule(module_path)
        if layer.merged:
            raise ExportError(
                f"{module_path!r} has merged adapters {list(layer.merged)}; call model.unmerge() before exporting"
            )
        if isinstance(module, Full):
            tensors.update(_dense_to_peft(module_path, layer.base, module.state_dict()))
            saved.append(module_path)
            continue
        yield module_path, module, layer.base


def _check_fields(config: Any) -> None:
    """Refuse config fields the PEFT format cannot carry (a future variant's extra setting, say)."""
    for f in dataclasses.fields(config):
        if f.name in CONFIG_FIELDS or f.name in _OTHER_FIELDS:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if getattr(config, f.name) != default:
            raise ExportError(f"config field {f.name}={getattr(config, f.name)!r} has no PEFT equivalent")
    for key, changes in config.overrides.items():
        other = sorted(set(changes) - set(_PATTERNS))
        if other:
            raise ExportError(
                f"overrides[{key!r}] sets {other} per module; PEFT can only vary {sorted(_PATTERNS)} per module"
            )


def _check_peft_conv(base: BaseView, module_path: str, error: type[Exception]) -> None:
    """PEFT's LoRA conv uses the base kernel, stride and padding but not dilation or padding mode."""
    if base.kind != "conv2d":
        return
    m = base.module
    if any(d != 1 for d in m.dilation) or m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise error(
            f"{module_path!r}: PEFT's LoRA for Conv2d ignores dilation={m.dilation}, padding={m.padding!r} and "
            f"padding_mode={m.padding_mode!r}, so it would compute something else"
        )


def _stored(base: BaseView, canonical: Tensor) -> Tensor:
    return canonical.T if base.transposed else canonical


def _dense_to_peft(module_path: str, base: BaseView, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The whole module as PEFT's ``modules_to_save`` holds it: ``W + ΔW`` (module layout) and ``b + Δb``."""
    with torch.no_grad():
        out = {f"{PREFIX}{module_path}.weight": _stored(base, base.weight + state["weight_delta"].to(base.dtype))}
        if base.bias is not None:
            delta = state.get("bias_delta")
            out[f"{PREFIX}{module_path}.bias"] = base.bias if delta is None else base.bias + delta.to(base.bias.dtype)
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------- import
def import_peft(base_model: nn.Module, path: str | Path, name: str = "default") -> AdaptedModel:
    """Load a Hugging Face PEFT LoRA / rsLoRA / DoRA folder (``adapter_config.json`` +
    ``adapter_model.safetensors``) as a peftkit adapter, with PEFT's outputs.

    Args:
        base_model: the base model the adapter was trained on, or an ``AdaptedModel`` to add it to.
        path: the PEFT adapter folder.
        name: the adapter name to use (it becomes the active adapter).

    Returns:
        The ``AdaptedModel`` holding the adapter.

    Raises:
        AdapterFileError: a missing, unreadable or inconsistent file.
        UnsupportedAdapterError: a ``peft_type`` or option peftkit cannot express (see the module docstring).
        BaseModelMismatch: the adapter names a module this model lacks, or a tensor of the wrong shape.
    """
    folder = Path(path)
    raw = _read_peft_config(folder)
    fmt = next((f for f in PEFT_FORMATS.values() if f.peft_type == raw.get("peft_type")), None)
    if fmt is not None:
        return _import_format(base_model, folder, raw, fmt, name)
    method = _check_options(raw, folder)
    tensors = _read_peft_tensors(folder)
    net = base_model.model if isinstance(base_model, AdaptedModel) else base_model
    modules = dict(inject.base_modules(net))
    lora, dense, base_weights = _split_keys(tensors, folder)
    r, alpha, overrides = _rank_and_alpha(raw, lora, folder)
    for module_path in [*lora, *dense]:
        module = modules.get(module_path)
        if module is None:
            raise BaseModelMismatch(f"the PEFT adapter at {folder} adapts {module_path!r}; this model has none")
        if layer_kind(module) is None:
            raise UnsupportedAdapterError(f"{module_path!r} is a {type(module).__name__}, which peftkit cannot wrap")
    _check_base_weights(base_weights, lora, modules, folder)
    cls = get_method(method)
    for module_path in lora:
        base = BaseView(modules[module_path])
        if not cls.supports(modules[module_path]) or base.kind not in TENSOR_NAMES[method]:
            kind = base.describe()["type"]
            raise UnsupportedAdapterError(f"{module_path!r}: peftkit's {method!r} cannot adapt a {kind}")
        _check_peft_conv(base, module_path, UnsupportedAdapterError)
    fields = {ours: raw[peft] for ours, peft in CONFIG_FIELDS.items() if peft in raw}
    fields.update(r=r, alpha=float(alpha), bias=bool(raw.get("lora_bias", False)))
    fields["dropout"] = float(fields.get("dropout") or 0.0)
    fields["rslora"] = bool(fields.get("rslora", False))
    try:
        config = cls.config_class(
            targets=_exact_targets(sorted(lora), modules),
            modules_to_save=sorted(dense),
            overrides=overrides,
            init="gaussian" if raw.get("init_lora_weights") == "gaussian" else "kaiming",
            **fields,
        )
    except (InvalidConfigError, TypeError) as exc:
        raise UnsupportedAdapterError(f"{folder}: the config has no peftkit {method!r} equivalent: {exc}") from None
    return _add_imported(
        base_model, name, config, folder, lambda m: _load_peft_tensors(m, name, lora, dense, modules, method, folder)
    )


def _add_imported(
    base_model: nn.Module, name: str, config: Any, folder: Path, fill: Callable[[AdaptedModel], None]
) -> AdaptedModel:
    """Add the imported adapter and ``fill`` its tensors. On any failure the caller's model is left as it was:
    the adapter is removed and, when this call wrapped the model, the base's ``requires_grad`` flags restored."""
    with restore_grad_flags_on_error(base_model):
        model = base_model if isinstance(base_model, AdaptedModel) else AdaptedModel(base_model)
        try:
            model.add_adapter(name, config, activate=True)
        except (TargetModuleError, InvalidConfigError) as exc:
            raise UnsupportedAdapterError(f"{folder}: {exc}") from None
        try:
            fill(model)
        except BaseException:
            model.delete_adapter(name)
            raise
    return model


def _load_peft_tensors(
    model: AdaptedModel,
    name: str,
    lora: dict[str, dict[str, Tensor]],
    dense: dict[str, dict[str, Tensor]],
    modules: dict[str, nn.Module],
    method: str,
    folder: Path,
) -> None:
    if set(model.layer_paths[name]) != set(lora) | set(dense):
        raise BaseModelMismatch(
            f"{folder}: the adapter's modules {sorted(set(lora) | set(dense))} select "
            f"{sorted(model.layer_paths[name])} on this model"
        )
    for module_path, module in model.adapter_modules(name).items():
        if module_path in dense:
            state = _dense_from_peft(module_path, module.state_dict(), dense[module_path], modules, folder)
        else:
            kind = model.model.get_submodule(module_path).base.kind
            state = _lora_from_peft(module_path, kind, module.state_dict(), lora[module_path], method, folder)
        module.load_state_dict(state)


def _read_peft_config(folder: Path) -> dict[str, Any]:
    file = folder / PEFT_CONFIG_FILE
    if not file.is_file():
        raise AdapterFileError(f"{folder} is not a PEFT adapter folder: {PEFT_CONFIG_FILE} is missing")
    try:
        raw = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{file} does not hold a JSON object")
    return raw


def _read_peft_tensors(folder: Path) -> dict[str, Tensor]:
    file = folder / PEFT_WEIGHTS_FILE
    if not file.is_file():
        pickled = " (only adapter_model.bin is there: peftkit does not read pickle files)"
        extra = pickled if (folder / "adapter_model.bin").is_file() else ""
        raise AdapterFileError(f"{folder}: {PEFT_WEIGHTS_FILE} is missing{extra}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{file} is truncated or corrupted: {exc}") from None


def _check_options(raw: dict[str, Any], folder: Path) -> str:
    """Refuse what peftkit cannot express; return the peftkit method name."""
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"{folder}: peft_type {peft_type!r} is not supported; peftkit imports LORA adapters "
            f"(LoRA, rsLoRA, DoRA, lora_bias) and {sorted(f.peft_type for f in PEFT_FORMATS.values())}"
        )
    for option, why in _REFUSED_OPTIONS.items():
        if raw.get(option) not in (None, False, [], {}):
            raise UnsupportedAdapterError(f"{folder}: PEFT option {option}={raw[option]!r} is not supported: {why}")
    if raw.get("bias", "none") != "none":
        raise UnsupportedAdapterError(
            f"{folder}: bias={raw['bias']!r} (trained base biases) is not supported; only bias='none' is"
        )
    init = raw.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise UnsupportedAdapterError(
            f"{folder}: init_lora_weights={init!r} rewrites the base weights, so the saved tensors do not apply to "
            "the untouched base; convert it to plain LoRA in PEFT (path_initial_model_for_weight_conversion)"
        )
    return "dora" if raw.get("use_dora") else "lora"


def _split_keys(
    tensors: dict[str, Tensor], folder: Path
) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, Tensor]], dict[str, dict[str, Tensor]]]:
    """``{module path: {PEFT suffix: tensor}}`` for LoRA modules, whole saved modules (``modules_to_save``)
    and base weights of adapted modules (PEFT's ``save_embedding_layers`` writes ``<path>.base_layer.*``)."""
    suffixes = {s for kinds in TENSOR_NAMES.values() for names in kinds.values() for s in names.values()}
    suffixes |= set(_ALIASES)
    lora: dict[str, dict[str, Tensor]] = {}
    dense: dict[str, dict[str, Tensor]] = {}
    base_weights: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        rest = key.removeprefix(PREFIX)
        suffix = next((s for s in suffixes if rest.endswith("." + s)), None)
        if suffix is not None:
            lora.setdefault(rest[: -len(suffix) - 1], {})[_ALIASES.get(suffix, suffix)] = t
            continue
        module_path, _, param = rest.rpartition(".")
        if param not in _DENSE_NAMES.values() or not module_path:
            raise AdapterFileError(f"{folder}: tensor {key!r} is neither a LoRA tensor nor a saved module's weight")
        if module_path.endswith(".base_layer"):
            base_weights.setdefault(module_path.removesuffix(".base_layer"), {})[param] = t
        else:
            dense.setdefault(module_path, {})[param] = t
    if not lora:
        raise AdapterFileError(f"{folder}: {PEFT_WEIGHTS_FILE} holds no LoRA tensors")
    return lora, dense, base_weights


def _check_base_weights(
    saved: dict[str, dict[str, Tensor]], lora: dict[str, Any], modules: dict[str, nn.Module], folder: Path
) -> None:
    """PEFT saves the base weights of targeted embedding / output layers too: accept them when they are this
    model's weights (the usual case), refuse them when they differ (a resized or trained embedding)."""
    for module_path, params in saved.items():
        module = modules.get(module_path)
        if module_path not in lora or module is None:
            raise AdapterFileError(f"{folder}: base weights of {module_path!r}, which the adapter does not adapt")
        for param, t in params.items():
            own = getattr(module, param, None)
            if not isinstance(own, Tensor) or own.shape != t.shape or not torch.equal(own.detach(), t.to(own)):
                raise UnsupportedAdapterError(
                    f"{folder}: the adapter carries its own base {param} for {module_path!r} (a resized or trained "
                    "embedding); peftkit adapters apply to the untouched base weights"
                )


def _pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern whose regex matches the end of the module path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return value
    return default


def _rank_and_alpha(
    raw: dict[str, Any], lora: dict[str, dict[str, Tensor]], folder: Path
) -> tuple[int, float, dict[str, dict[str, Any]]]:
    """The most common (rank, alpha) of the adapted modules, and overrides for the modules that differ."""
    rank_pattern = raw.get("rank_pattern") or {}
    alpha_pattern = raw.get("alpha_pattern") or {}
    pairs = {}
    for module_path, parts in lora.items():
        down = parts.get("lora_A.weight", parts.get("lora_embedding_A"))
        if down is None:
            raise AdapterFileError(f"{folder}: {module_path!r} has no lora_A tensor")
        r = _pattern_value(rank_pattern, module_path, raw.get("r", 8))
        if down.shape[0] != r:
            raise AdapterFileError(f"{folder}: {module_path!r} has rank {down.shape[0]} but the config says {r}")
        pairs[module_path] = (r, _pattern_value(alpha_pattern, module_path, raw.get("lora_alpha", 8)))
    for r, alpha in set(pairs.values()):
        bad_r = not isinstance(r, int) or isinstance(r, bool)
        if bad_r or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise AdapterFileError(f"{folder}: invalid r={r!r} or lora_alpha={alpha!r}")
    counts = collections.Counter(pairs.values())
    r, alpha = max(sorted(counts), key=lambda pair: counts[pair])
    overrides: dict[str, dict[str, Any]] = {}
    for module_path, (r_m, alpha_m) in pairs.items():
        changes = {k: v for k, v, default in (("r", r_m, r), ("alpha", float(alpha_m), float(alpha))) if v != default}
        if changes:
            overrides[module_path] = changes
    return r, float(alpha), overrides


def _exact_targets(paths: list[str], modules: dict[str, nn.Module]) -> list[str] | str:
    """The paths as suffix targets, or an exact regex where a path is also the suffix of another module."""
    clash = any(m != p and m.endswith("." + p) for p in paths for m in modules)
    return "|".join(re.escape(p) for p in paths) if clash else paths


def _lora_from_peft(
    module_path: str, kind: str, ours: dict[str, Tensor], parts: dict[str, Tensor], method: str, folder: Path
) -> dict[str, Tensor]:
    names = {k: v for k, v in TENSOR_NAMES[method][kind].items() if k in ours}
    missing = sorted(set(names.values()) - set(parts))
    unexpected = sorted(set(parts) - set(names.values()))
    if missing or unexpected:
        raise AdapterFileError(f"{folder}: {module_path!r}: missing PEFT tensors {missing}, unexpected {unexpected}")
    state = {}
    for name, suffix in names.items():
        want = tuple(ours[name].shape)
        peft_shape = _PEFT_SHAPE.get((kind, name), tuple)(want)
        got = parts[suffix]
        if tuple(got.shape) != peft_shape:
            raise BaseModelMismatch(
                f"{folder}: {module_path}.{suffix} has shape {tuple(got.shape)}; this model needs {peft_shape}"
            )
        state[name] = got.reshape(want)
    return state


def _dense_from_peft(
    module_path: str, ours: dict[str, Tensor], parts: dict[str, Tensor], modules: dict[str, nn.Module], folder: Path
) -> dict[str, Tensor]:
    base = BaseView(modules[module_path])
    expected = {_DENSE_NAMES[k] for k in ours}
    if set(parts) != expected:
        raise AdapterFileError(
            f"{folder}: saved module {module_path!r} has tensors {sorted(parts)}; this model's has {sorted(expected)}"
        )
    weight = parts["weight"]
    if tuple(weight.shape) != tuple(base.module.weight.shape):
        raise BaseModelMismatch(
            f"{folder}: {module_path}.weight has shape {tuple(weight.shape)}; this model's is "
            f"{tuple(base.module.weight.shape)}"
        )
    with torch.no_grad():
        canonical = weight.T if base.transposed else weight
        state = {"weight_delta": canonical.float() - base.weight.float()}
        if "bias" in parts:
            state["bias_delta"] = parts["bias"].float() - base.bias.float()
    return state


# ------------------------------------------------------------------------------- other PEFT tuners (table)
@dataclasses.dataclass(frozen=True)
class PeftFormat:
    """How one peftkit method is written as one PEFT tuner (data; the flow below is shared by all of them).

    Attributes:
        peft_type: PEFT's ``peft_type``.
        tensors: layer kind (``"linear"``, ``"conv1d"`` for GPT-2's Conv1D, ``"conv2d"``) -> our saved tensor ->
            PEFT key suffix. A kind missing here is not expressible in PEFT.
        fields: our config field -> PEFT config field holding the same value.
        values: our config field -> (PEFT field, {our value: PEFT value}, {extra PEFT value: our value}); the
            import reads the inverse of the first map plus the second.
        fixed: PEFT config fields written with a fixed value.
        ignored: our config fields that do not change a trained adapter (its init, or what the frozen-tensor
            check below verifies instead).
        frozen: PEFT suffix of a saved frozen tensor -> our unsaved buffer it must begin with (import check).
        required: PEFT field -> the values peftkit can import.
        fan_in_fan_out: PEFT needs ``fan_in_fan_out=True`` when a GPT-2 Conv1D is targeted.
        implied: our config fields that PEFT derives from all adapted layers at once (RandLoRA's shared bases).
        patterns: our config field -> PEFT's per-module pattern field (``rank_pattern``), read with PEFT's
            ``get_pattern_key``; our per-module ``overrides`` of that field are written there. Overrides of any
            other field are not expressible.
    """

    peft_type: str
    tensors: dict[str, dict[str, str]]
    fields: dict[str, str] = dataclasses.field(default_factory=dict)
    values: dict[str, tuple[str, dict[Any, Any], dict[Any, Any]]] = dataclasses.field(default_factory=dict)
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)
    ignored: frozenset[str] = frozenset()
    frozen: dict[str, str] = dataclasses.field(default_factory=dict)
    required: dict[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)
    fan_in_fan_out: bool = False
    implied: Callable[[list[BaseView]], dict[str, Any]] | None = None
    patterns: dict[str, str] = dataclasses.field(default_factory=dict)


def _lycoris(prefix: str, names: tuple[str, ...]) -> dict[str, dict[str, str]]:
    return {kind: {n: prefix + n for n in names} for kind in ("linear", "conv2d")}


def _randlora_projection(views: list[BaseView]) -> dict[str, Any]:
    """PEFT sizes RandLoRA's shared bases by the elementwise max of the adapted layers' ``(out, in)``."""
    return {"projection_shape": [max(v.out_features for v in views), max(v.in_features for v in views)]}


_RANK_ALPHA_PATTERNS = {"r": "rank_pattern", "alpha": "alpha_pattern"}
_INIT_TRUE_FALSE = {"zeros": True, "randn": False}
#: method -> its PEFT tuner (methods other than LoRA / DoRA, whose tables are above).
PEFT_FORMATS: dict[str, PeftFormat] = {
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
        required={"bias": ("none", None)},
        fan_in_fan_out=True,
        implied=_randlora_projection,
    ),
    "fourierft": PeftFormat(
        "FOURIERFT",
        {kind: {"spectrum": "fourierft_spectrum"} for kind in ("linear", "conv1d")},
        fields={"n_frequency": "n_frequency", "scaling": "scaling", "random_loc_seed": "random_loc_seed"},
        values={"init": ("init_weights", _INIT_TRUE_FALSE, {})},
        fixed={"n_frequency_pattern": {}, "bias": "none"},
        required={"n_frequency_pattern": ({}, None), "bias": ("none", None)},
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
        required={"bias": ("none", None)},
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


def _format_kind(base: BaseView) -> str:
    return "conv1d" if base.kind == "linear" and base.transposed else base.kind


def _config_from_peft(
    fmt: PeftFormat, cls: type, raw: dict[str, Any], views: dict[str, BaseView], **common: Any
) -> Any:
    """The peftkit config a PEFT config means (also used on export: what PEFT will rebuild from our folder)."""
    fields = {ours: raw[peft] for ours, peft in fmt.fields.items() if peft in raw}
    for ours, (peft, to_peft, extra) in fmt.values.items():
        if peft not in raw:
            continue
        back = [(p, o) for o, p in to_peft.items()] + list(extra.items())
        match = [o for p, o in back if p == raw[peft] and type(p) is type(raw[peft])]
        if not match:
            raise UnsupportedAdapterError(f"PEFT {fmt.peft_type} option {peft}={raw[peft]!r} has no peftkit equivalent")
        fields[ours] = match[0]
    if fmt.implied is not None:
        fields.update(fmt.implied(list(views.values())))
    overrides: dict[str, dict[str, Any]] = {}
    for ours, pattern in fmt.patterns.items():
        for path in views:
            value = _pattern_value(raw.get(pattern) or {}, path, fields.get(ours))
            if value != fields.get(ours):
                overrides.setdefault(path, {})[ours] = value
    return cls.config_class(**common, **fields, overrides=overrides)


def _check_frozen(module: nn.Module, cls: type, base: BaseView, config: Any, module_path: str, hint: str) -> None:
    """The tensors we do not save (bases, locations rebuilt from a seed) must be what PEFT rebuilds from ``config``."""
    saved = set(module.state_dict())
    unsaved = {n: b for n, b in module.named_buffers() if n not in saved}
    if not unsaved:
        return
    with skip_init():
        rebuilt = cls(base, config)
    for n, b in unsaved.items():
        other = rebuilt.get_buffer(n)
        if other.shape != b.shape or not torch.equal(other.to(b), b):
            raise ExportError(f"{module_path!r}: PEFT would rebuild {n!r} differently from this adapter's; {hint}")


def _export_format(
    model: AdaptedModel, name: str, config: Any, fmt: PeftFormat, target: Path, task_type: str | None
) -> Path:
    cls = get_method(type(config).method)
    tensors: dict[str, Tensor] = {}
    views: dict[str, BaseView] = {}
    saved: list[str] = []
    modules = model.adapter_modules(name)
    for module_path, module, base in _exported_modules(model, name, tensors, saved):
        names = fmt.tensors.get(_format_kind(base))
        if names is None:
            raise ExportError(f"{module_path!r}: PEFT's {fmt.peft_type} has no adapter for a {base.describe()['type']}")
        for ours, t in module.state_dict().items():
            tensors[f"{PREFIX}{module_path}.{names[ours]}"] = t.detach().contiguous().cpu()
        views[module_path] = base
    if not views:
        raise ExportError(f"adapter {name!r} adapts no module (only modules_to_save): PEFT needs one")
    peft_config: dict[str, Any] = {
        "peft_type": fmt.peft_type,
        "task_type": task_type,
        "base_model_name_or_path": getattr(getattr(model.model, "config", None), "name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "target_modules": sorted(views),
        "modules_to_save": sorted(saved) or None,
        **fmt.fixed,
        **{peft: getattr(config, ours) for ours, peft in fmt.fields.items()},
        **{peft: to_peft[getattr(config, ours)] for ours, (peft, to_peft, _) in fmt.values.items()},
    }
    if fmt.fan_in_fan_out:
        peft_config["fan_in_fan_out"] = any(_format_kind(v) == "conv1d" for v in views.values())
    for ours, pattern in fmt.patterns.items():
        peft_config[pattern] = {
            re.escape(p): getattr(modules[p].config, ours)
            for p in views
            if getattr(modules[p].config, ours) != getattr(config, ours)
        }
    # What PEFT rebuilds from the folder must be this adapter: every setting carried (per module), every frozen
    # tensor the same.
    back = _config_from_peft(
        fmt, cls, peft_config, views, targets=config.targets, modules_to_save=config.modules_to_save
    )
    implied = fmt.implied(list(views.values())) if fmt.implied is not None else {}
    hint = f"PEFT derives {implied} from the adapted layers: train with those settings" if implied else ""
    for module_path, base in views.items():
        mine, theirs = modules[module_path].config, back.for_module(module_path)
        for f in dataclasses.fields(mine):
            if f.name in _OTHER_FIELDS or f.name in fmt.ignored or getattr(theirs, f.name) == getattr(mine, f.name):
                continue
            where = "" if getattr(mine, f.name) == getattr(config, f.name) else f" (an override of {module_path!r})"
            raise ExportError(
                f"config field {f.name}={getattr(mine, f.name)!r}{where} has no PEFT {fmt.peft_type} equivalent "
                f"(PEFT would use {getattr(theirs, f.name)!r})"
            )
        _check_frozen(modules[module_path], cls, base, theirs, module_path, hint)

    return _write_peft_folder(target, peft_config, tensors)


def _import_format(
    base_model: nn.Module, folder: Path, raw: dict[str, Any], fmt: PeftFormat, name: str
) -> AdaptedModel:
    for option, allowed in fmt.required.items():
        if raw.get(option) not in allowed:
            raise UnsupportedAdapterError(f"{folder}: PEFT option {option}={raw[option]!r} is not supported")
    method = next(m for m, f in PEFT_FORMATS.items() if f is fmt)
    cls = get_method(method)
    modules = dict(inject.base_modules(base_model.model if isinstance(base_model, AdaptedModel) else base_model))
    suffixes = {s for names in fmt.tensors.values() for s in names.values()} | set(fmt.frozen)
    parts: dict[str, dict[str, Tensor]] = {}
    dense: dict[str, dict[str, Tensor]] = {}
    for key, t in _read_peft_tensors(folder).items():
        if not key.startswith(PREFIX) and key.removeprefix("base_model.") in fmt.frozen:
            continue  # PEFT's shared copy of the bases; each module's copy is checked below
        rest = key.removeprefix(PREFIX)
        suffix = next((s for s in suffixes if rest.endswith("." + s)), None)
        module_path, _, param = rest.rpartition(".")
        if suffix is not None:
            parts.setdefault(rest[: -len(suffix) - 1], {})[suffix] = t
        elif key.startswith(PREFIX) and param in _DENSE_NAMES.values() and not module_path.endswith(".base_layer"):
            dense.setdefault(module_path, {})[param] = t
        else:
            raise AdapterFileError(f"{folder}: tensor {key!r} is neither a {fmt.peft_type} tensor nor a saved module")
    if not parts:
        raise AdapterFileError(f"{folder}: {PEFT_WEIGHTS_FILE} holds no {fmt.peft_type} tensors")
    for module_path in [*parts, *dense]:
        if module_path not in modules:
            raise BaseModelMismatch(f"the PEFT adapter at {folder} adapts {module_path!r}; this model has none")
        if layer_kind(modules[module_path]) is None:
            kind = type(modules[module_path]).__name__
            raise UnsupportedAdapterError(f"{module_path!r} is a {kind}, which peftkit cannot wrap")
    views = {p: BaseView(modules[p]) for p in sorted(parts)}
    for module_path, view in views.items():
        if not cls.supports(modules[module_path]) or _format_kind(view) not in fmt.tensors:
            kind = view.describe()["type"]
            raise UnsupportedAdapterError(f"{module_path!r}: peftkit's {method!r} cannot adapt a {kind}")
    try:
        config = _config_from_peft(
            fmt, cls, raw, views, targets=_exact_targets(sorted(parts), modules), modules_to_save=sorted(dense)
        )
    except (InvalidConfigError, TypeError) as exc:
        raise UnsupportedAdapterError(f"{folder}: the config has no peftkit {method!r} equivalent: {exc}") from None

    def fill(model: AdaptedModel) -> None:
        for module_path, module in model.adapter_modules(name).items():
            if module_path in dense:
                state = _dense_from_peft(module_path, module.state_dict(), dense[module_path], modules, folder)
            else:
                state = _format_state(fmt, module, views[module_path], parts[module_path], module_path, folder)
            module.load_state_dict(state)

    return _add_imported(base_model, name, config, folder, fill)


def _format_state(
    fmt: PeftFormat, module: nn.Module, base: BaseView, parts: dict[str, Tensor], module_path: str, folder: Path
) -> dict[str, Tensor]:
    """Our state dict from one module's PEFT tensors; saved frozen tensors must be the ones we rebuild."""
    ours = module.state_dict()
    names = fmt.tensors[_format_kind(base)]
    expected = {names[n] for n in ours}
    got = set(parts) - set(fmt.frozen)
    if got != expected:
        missing, unexpected = sorted(expected - got), sorted(got - expected)
        raise AdapterFileError(f"{folder}: {module_path!r}: missing PEFT tensors {missing}, unexpected {unexpected}")
    state = {}
    for n, t in ours.items():
        src = parts[names[n]]
        if src.shape != t.shape:
            raise BaseModelMismatch(
                f"{folder}: {module_path}.{names[n]} has shape {tuple(src.shape)}; this model needs {tuple(t.shape)}"
            )
        state[n] = src.to(t.dtype)
    for suffix, buffer in fmt.frozen.items():
        if suffix in parts:
            mine = module.get_buffer(buffer)
            lead = parts[suffix][tuple(slice(0, s) for s in mine.shape)]
            if lead.shape != mine.shape or not torch.equal(lead.to(mine), mine):
                raise UnsupportedAdapterError(
                    f"{folder}: {module_path}.{suffix} is not the {buffer!r} peftkit rebuilds from the config's seed"
                )
    return state
