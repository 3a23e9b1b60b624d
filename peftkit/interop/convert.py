"""Export to and import from Hugging Face PEFT folders: one flow each, driven by the table in
:mod:`peftkit.interop.formats` (the ``peft`` library is not needed).

Export (:func:`export_peft`): every module of the adapter is written with its method's entry (``modules_to_save``
modules with the dense entry), from what the module says it exports (``Adapter.export_state`` and
``AdapterConfig.export_config`` where a method defines them, e.g. LoRA's residual inits as a plain rank-``2r``
LoRA; else ``state_dict()`` and the config). The folder's config is then read back as PEFT will read it, and
any setting it does not carry (per module) or any frozen tensor PEFT would rebuild differently raises
:class:`ExportError` naming it, before anything is written.

Import (:func:`import_peft`): the entry is found from ``peft_type`` (and ``use_dora``), the config is translated,
PEFT's keys and shapes become peftkit's, and the tensors reach the adapter through
:meth:`AdaptedModel.load_tensors` (the one path from saved tensors to adapter modules; all or nothing).

Design decisions:

* Targets are written as the explicit list of module paths, and on import the adapted modules are read from
  the tensor keys, not re-derived from ``target_modules``. PEFT's ``layers_to_transform``, ``layers_pattern``
  and ``exclude_modules`` therefore import correctly (the keys already say which layers were adapted).
* Per-module settings: PEFT's pattern fields (``rank_pattern`` / ``alpha_pattern``) <-> our config
  ``overrides``. Export writes one escaped full-path pattern per module whose value differs; import takes the
  most common value of each field as the config's and writes an override for every module that differs.
  Overrides of any other field have no PEFT equivalent (:class:`ExportError`).
* Frozen tensors rebuilt from a seed are never written (RandLoRA ``save_projection=False``; FourierFT's
  locations); saved ones (PEFT's default RandLoRA bases) are checked against the rebuilt ones on import.
* PEFT saves the base weights of targeted embedding / output layers (``<path>.base_layer.*``): accepted when
  they are this model's weights, refused when they differ (a resized or trained embedding).
* Refused with a clear error: other ``peft_type`` s and the options each entry's ``required`` lists (for LoRA:
  ``bias != "none"``, base-rewriting inits such as PiSSA, OLoRA, CorDA, LoftQ — convert them to plain LoRA in
  PEFT first — LoRA variants with their own forward, ``target_parameters``, ``trainable_token_indices``,
  ``layer_replication``), dilated or non-zero-padded Conv2d for LoRA (PEFT's LoRA conv ignores dilation and
  padding mode), pickle-only folders (``adapter_model.bin``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from peftkit.core import inject
from peftkit.core.base import BaseView, layer_kind
from peftkit.core.config import AdapterConfig
from peftkit.core.dense import Full
from peftkit.core.errors import (
    AdapterFileError,
    BaseModelMismatch,
    ExportError,
    InvalidConfigError,
    TargetModuleError,
    UnsupportedAdapterError,
)
from peftkit.core.model import AdaptedModel, restore_grad_flags_on_error
from peftkit.core.protocol import Adapter, skip_init
from peftkit.core.registry import get_method
from peftkit.core.state import describe

from .configs import check_overrides, config_from_peft, exact_targets, to_peft_config
from .folder import PEFT_WEIGHTS_FILE, read_peft_config, read_peft_tensors, write_peft_folder
from .formats import DENSE, PEFT_FORMATS, PREFIX, PeftFormat, format_kind

__all__ = ["export_peft", "import_peft"]

# Our config fields never compared with what PEFT rebuilds (written another way, or irrelevant to a trained
# adapter: the init only drew the starting values).
_OTHER_FIELDS = frozenset({"targets", "exclude", "modules_to_save", "seed", "init", "overrides"})


# ---------------------------------------------------------------------------------------------------- export
def export_peft(
    model: AdaptedModel, path: str | Path, adapter: str | None = None, *, task_type: str | None = None
) -> Path:
    """Write one adapter as a Hugging Face PEFT folder that ``peft.PeftModel.from_pretrained`` loads.

    Args:
        model: the adapted model.
        path: the folder to write (its two files are replaced atomically; other files stay).
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
    fmt = PEFT_FORMATS.get(method)
    if fmt is None or fmt.peft_type is None:
        known = sorted(m for m, f in PEFT_FORMATS.items() if f.peft_type is not None)
        raise ExportError(
            f"adapter {name!r} uses method {method!r}, which has no Hugging Face PEFT equivalent; "
            f"PEFT folders hold {known} adapters (plus modules_to_save)"
        )
    check_overrides(config, fmt)
    modules = model.adapter_modules(name)
    tensors: dict[str, Tensor] = {}
    views: dict[str, BaseView] = {}
    configs: dict[str, AdapterConfig] = {}
    saved: list[str] = []
    for module_path, module in modules.items():
        layer = model.model.get_submodule(module_path)
        if layer.merged:
            raise ExportError(
                f"{module_path!r} has merged adapters {list(layer.merged)}; call model.unmerge() before exporting"
            )
        entry = DENSE if isinstance(module, Full) else fmt
        tensors.update(_to_peft(entry, module_path, layer.base, module.export_state()))
        if entry is DENSE:
            saved.append(module_path)
        else:
            views[module_path] = layer.base
            configs[module_path] = module.config.export_config()
    if not views:
        raise ExportError(f"adapter {name!r} adapts no module with {method!r} (only modules_to_save): PEFT needs one")
    exported = config.export_config()
    name_or_path = getattr(getattr(model.model, "config", None), "name_or_path", None) or None
    peft_config = to_peft_config(fmt, exported, configs, views, sorted(saved), task_type, name_or_path)
    _check_rebuilt(fmt, method, peft_config, views, configs, modules, exported)
    return write_peft_folder(path, peft_config, tensors)


def _to_peft(entry: PeftFormat, module_path: str, base: BaseView, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """One module's tensors under PEFT's keys, in PEFT's shapes and values."""
    kind = format_kind(base)
    names = entry.tensors.get(kind)
    if names is None:
        raise ExportError(f"{module_path!r}: PEFT's {entry.peft_type} has no adapter for a {base.describe()['type']}")
    reason = entry.check_base(base) if entry.check_base is not None else None
    if reason is not None:
        raise ExportError(f"{module_path!r}: {reason}")
    out = {}
    for ours, t in (entry.to_peft(base, state) if entry.to_peft is not None else state).items():
        if ours not in names:
            raise ExportError(f"{module_path!r}: tensor {ours!r} has no PEFT {entry.peft_type} equivalent")
        lead, trail = entry.singletons.get((kind, ours), (0, 0))
        shape = (1,) * lead + tuple(t.shape) + (1,) * trail
        out[f"{PREFIX}{module_path}.{names[ours]}"] = t.detach().reshape(shape).contiguous().cpu()
    return out


def _check_rebuilt(
    fmt: PeftFormat,
    method: str,
    peft_config: dict[str, Any],
    views: dict[str, BaseView],
    configs: dict[str, AdapterConfig],
    modules: dict[str, Adapter],
    exported: AdapterConfig,
) -> None:
    """What PEFT rebuilds from the folder must be this adapter: every setting carried (per module), every frozen
    tensor the same."""
    cls = get_method(method)
    back = config_from_peft(
        fmt, cls.config_class, peft_config, views, targets=exported.targets, modules_to_save=exported.modules_to_save
    )
    implied = fmt.implied(list(views.values())) if fmt.implied is not None else {}
    hint = f"PEFT derives {implied} from the adapted layers: train with those settings" if implied else ""
    for module_path, base in views.items():
        mine, theirs = configs[module_path], back.for_module(module_path)
        for f in dataclasses.fields(mine):
            if f.name in _OTHER_FIELDS or f.name in fmt.ignored or getattr(theirs, f.name) == getattr(mine, f.name):
                continue
            where = "" if getattr(mine, f.name) == getattr(exported, f.name) else f" (an override of {module_path!r})"
            raise ExportError(
                f"config field {f.name}={getattr(mine, f.name)!r}{where} has no PEFT {fmt.peft_type} equivalent "
                f"(PEFT would use {getattr(theirs, f.name)!r})"
            )
        _check_frozen(modules[module_path], cls, base, theirs, module_path, hint)


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


# ---------------------------------------------------------------------------------------------------- import
def import_peft(base_model: nn.Module, path: str | Path, name: str = "default") -> AdaptedModel:
    """Load a Hugging Face PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) of a tuner in
    :data:`~peftkit.interop.formats.PEFT_FORMATS` (LoRA, rsLoRA, DoRA, SHiRA, RandLoRA, FourierFT, MiSS, LoKr,
    LoHa, with ``modules_to_save``) as a peftkit adapter, with PEFT's outputs.

    Args:
        base_model: the base model the adapter was trained on, or an ``AdaptedModel`` to add it to.
        path: the PEFT adapter folder.
        name: the adapter name to use (it becomes the active adapter).

    Returns:
        The ``AdaptedModel`` holding the adapter. On any error the model is left as it was.

    Raises:
        AdapterFileError: a missing, unreadable or inconsistent file.
        UnsupportedAdapterError: a ``peft_type`` or option peftkit cannot express (see the module docstring).
        BaseModelMismatch: the adapter names a module this model lacks, or a tensor of the wrong shape.
    """
    folder = Path(path)
    raw = read_peft_config(folder)
    fmt = next((f for f in PEFT_FORMATS.values() if f.peft_type is not None and f.matches(raw)), None)
    if fmt is None:
        known = sorted({f.peft_type for f in PEFT_FORMATS.values() if f.peft_type is not None})
        raise UnsupportedAdapterError(
            f"{folder}: peft_type {raw.get('peft_type')!r} is not supported; peftkit imports {known}"
        )
    for option, (allowed, why) in fmt.required.items():
        if raw.get(option) not in allowed:
            raise UnsupportedAdapterError(f"{folder}: PEFT option {option}={raw.get(option)!r} is not supported: {why}")
    method = next(m for m, f in PEFT_FORMATS.items() if f is fmt)
    cls = get_method(method)
    modules = dict(inject.base_modules(base_model.model if isinstance(base_model, AdaptedModel) else base_model))
    parts, dense, base_weights = _split_keys(read_peft_tensors(folder), fmt, folder)
    for module_path in [*parts, *dense]:
        if module_path not in modules:
            raise BaseModelMismatch(f"the PEFT adapter at {folder} adapts {module_path!r}; this model has none")
        if layer_kind(modules[module_path]) is None:
            kind = type(modules[module_path]).__name__
            raise UnsupportedAdapterError(f"{module_path!r} is a {kind}, which peftkit cannot wrap")
    _check_base_weights(base_weights, parts, modules, folder)
    views = {p: BaseView(modules[p]) for p in sorted(parts)}
    for module_path, view in views.items():
        if not cls.supports(modules[module_path]) or format_kind(view) not in fmt.tensors:
            kind = view.describe()["type"]
            raise UnsupportedAdapterError(f"{module_path!r}: peftkit's {method!r} cannot adapt a {kind}")
        reason = fmt.check_base(view) if fmt.check_base is not None else None
        if reason is not None:
            raise UnsupportedAdapterError(f"{module_path!r}: {reason}")
    try:
        config = config_from_peft(
            fmt,
            cls.config_class,
            raw,
            views,
            targets=exact_targets(sorted(parts), modules),
            modules_to_save=sorted(dense),
        )
    except (InvalidConfigError, TypeError) as exc:
        raise UnsupportedAdapterError(f"{folder}: the config has no peftkit {method!r} equivalent: {exc}") from None
    tensors: dict[str, Tensor] = {}
    for module_path, view in views.items():
        tensors.update(_from_peft(fmt, module_path, view, parts[module_path], folder))
    for module_path, saved in dense.items():
        tensors.update(_from_peft(DENSE, module_path, BaseView(modules[module_path]), saved, folder))
    fingerprint = {p: describe(modules[p]) for p in [*views, *dense]}
    with restore_grad_flags_on_error(base_model):
        model = base_model if isinstance(base_model, AdaptedModel) else AdaptedModel(base_model)
        try:
            model.load_tensors(name, config, tensors, activate=True, source=str(folder), fingerprint=fingerprint)
        except (TargetModuleError, InvalidConfigError) as exc:
            raise UnsupportedAdapterError(f"{folder}: {exc}") from None
        except AdapterFileError:
            _explain(fmt, cls, config, views, parts, folder)
            raise
        try:
            _check_saved_frozen(fmt, model.adapter_modules(name), parts, folder)
        except BaseException:
            model.delete_adapter(name)
            raise
    return model


def _split_keys(
    tensors: dict[str, Tensor], fmt: PeftFormat, folder: Path
) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, Tensor]], dict[str, dict[str, Tensor]]]:
    """``{module path: {PEFT suffix: tensor}}`` for the tuner's modules, whole saved modules
    (``modules_to_save``: ``{"weight", "bias"}``) and base weights of adapted modules (PEFT's
    ``save_embedding_layers`` writes ``<path>.base_layer.*``)."""
    suffixes = sorted(fmt.suffixes(), key=len, reverse=True)
    parts: dict[str, dict[str, Tensor]] = {}
    dense: dict[str, dict[str, Tensor]] = {}
    base_weights: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX) and key.removeprefix("base_model.") in fmt.frozen:
            continue  # PEFT's shared copy of the bases; each module's copy is checked on import
        rest = key.removeprefix(PREFIX)
        suffix = next((s for s in suffixes if rest.endswith("." + s)), None)
        if suffix is not None:
            parts.setdefault(rest[: -len(suffix) - 1], {})[fmt.aliases.get(suffix, suffix)] = t
            continue
        module_path, _, param = rest.rpartition(".")
        if not key.startswith(PREFIX) or param not in ("weight", "bias") or not module_path:
            raise AdapterFileError(f"{folder}: tensor {key!r} is neither a {fmt.peft_type} tensor nor a saved module")
        into = base_weights if module_path.endswith(".base_layer") else dense
        into.setdefault(module_path.removesuffix(".base_layer"), {})[param] = t
    if not parts:
        raise AdapterFileError(f"{folder}: {PEFT_WEIGHTS_FILE} holds no {fmt.peft_type} tensors")
    return parts, dense, base_weights


def _check_base_weights(
    saved: dict[str, dict[str, Tensor]], adapted: dict[str, Any], modules: dict[str, nn.Module], folder: Path
) -> None:
    """PEFT saves the base weights of targeted embedding / output layers too: accept them when they are this
    model's weights (the usual case), refuse them when they differ (a resized or trained embedding)."""
    for module_path, params in saved.items():
        module = modules.get(module_path)
        if module_path not in adapted or module is None:
            raise AdapterFileError(f"{folder}: base weights of {module_path!r}, which the adapter does not adapt")
        for param, t in params.items():
            own = getattr(module, param, None)
            if not isinstance(own, Tensor) or own.shape != t.shape or not torch.equal(own.detach(), t.to(own)):
                raise UnsupportedAdapterError(
                    f"{folder}: the adapter carries its own base {param} for {module_path!r} (a resized or trained "
                    "embedding); peftkit adapters apply to the untouched base weights"
                )


def _from_peft(
    entry: PeftFormat, module_path: str, base: BaseView, parts: dict[str, Tensor], folder: Path
) -> dict[str, Tensor]:
    """One module's PEFT tensors as peftkit's ``<module path>.<tensor>`` (saved frozen tensors left out: they
    are checked after loading). PEFT's extra size-1 dims are dropped; other shapes are checked by the load."""
    kind = format_kind(base)
    ours_of = {suffix: ours for ours, suffix in entry.tensors[kind].items()}
    unexpected = sorted(s for s in parts if s not in ours_of and s not in entry.frozen)
    if unexpected:
        raise AdapterFileError(f"{folder}: {module_path!r}: unexpected PEFT tensors {unexpected}")
    state = {}
    for suffix, t in parts.items():
        if suffix in entry.frozen:
            continue
        ours = ours_of[suffix]
        lead, trail = entry.singletons.get((kind, ours), (0, 0))
        if t.dim() > lead + trail and all(s == 1 for s in (*t.shape[:lead], *t.shape[t.dim() - trail :])):
            t = t.reshape(t.shape[lead : t.dim() - trail])
        state[ours] = t
    if entry.from_peft is not None:
        state = entry.from_peft(base, state, f"{folder}: {module_path}")
    return {f"{module_path}.{ours}": t for ours, t in state.items()}


def _explain(
    fmt: PeftFormat,
    cls: type,
    config: AdapterConfig,
    views: dict[str, BaseView],
    parts: dict[str, dict[str, Tensor]],
    folder: Path,
) -> None:
    """After :meth:`AdaptedModel.load_tensors` refused the tensors, raise the error in PEFT's names: which PEFT
    tensors a module lacks or has in excess, or which has a shape this model (and the config) does not give."""
    for module_path, view in views.items():
        kind = format_kind(view)
        names = fmt.tensors[kind]
        with skip_init():
            ours = cls(view, config.for_module(module_path)).state_dict()
        expected = {names[n] for n in ours}
        got = set(parts[module_path]) - set(fmt.frozen)
        if got != expected:
            missing, unexpected = sorted(expected - got), sorted(got - expected)
            raise AdapterFileError(
                f"{folder}: {module_path!r}: missing PEFT tensors {missing}, unexpected {unexpected}"
            )
        for n, t in ours.items():
            lead, trail = fmt.singletons.get((kind, n), (0, 0))
            want = (1,) * lead + tuple(t.shape) + (1,) * trail
            have = tuple(parts[module_path][names[n]].shape)
            if have != want:
                raise BaseModelMismatch(f"{folder}: {module_path}.{names[n]} has shape {have}; this model needs {want}")


def _check_saved_frozen(
    fmt: PeftFormat, modules: dict[str, Adapter], parts: dict[str, dict[str, Tensor]], folder: Path
) -> None:
    """Saved frozen tensors (PEFT's RandLoRA bases) must begin with the ones peftkit rebuilt from the seed."""
    for module_path, module in modules.items():
        for suffix, buffer in fmt.frozen.items():
            if suffix not in parts.get(module_path, {}):
                continue
            mine = module.get_buffer(buffer)
            lead = parts[module_path][suffix][tuple(slice(0, s) for s in mine.shape)]
            if lead.shape != mine.shape or not torch.equal(lead.to(mine), mine):
                raise UnsupportedAdapterError(
                    f"{folder}: {module_path}.{suffix} is not the {buffer!r} peftkit rebuilds from the config's seed"
                )
