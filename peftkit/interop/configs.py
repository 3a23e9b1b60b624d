"""PEFT's config (``adapter_config.json``) <-> peftkit's config, by a :class:`~peftkit.interop.formats.PeftFormat`
entry: fields, value maps, fixed fields, and per-module settings (PEFT's ``rank_pattern`` / ``alpha_pattern``
<-> our ``overrides``: one escaped full-path pattern per module whose value differs on export; on import the most
common value of each field becomes the config's, and every module that differs gets an override)."""

from __future__ import annotations

import collections
import dataclasses
import re
import typing
from typing import Any

from torch import nn

from peftkit.core.base import BaseView
from peftkit.core.config import AdapterConfig
from peftkit.core.errors import ExportError, UnsupportedAdapterError

from .formats import PeftFormat, format_kind

__all__ = ["check_overrides", "config_from_peft", "exact_targets", "peft_number", "to_peft_config"]


def peft_number(value: Any) -> Any:
    """PEFT writes integral ranks and alphas as ints."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def to_peft_config(
    fmt: PeftFormat,
    exported: AdapterConfig,
    configs: dict[str, AdapterConfig],
    views: dict[str, BaseView],
    saved: list[str],
    task_type: str | None,
    name_or_path: str | None,
) -> dict[str, Any]:
    """The ``adapter_config.json`` for an adapter whose (exported) config is ``exported``, with per-module configs
    ``configs`` on the layers ``views`` and the whole modules ``saved`` (``modules_to_save``).

    Raises:
        ExportError: a config value that the entry's value maps do not carry.
    """
    peft_config: dict[str, Any] = {
        "peft_type": fmt.peft_type,
        "task_type": task_type,
        "base_model_name_or_path": name_or_path,
        "revision": None,
        "inference_mode": True,
        "target_modules": sorted(views),
        "modules_to_save": saved or None,
        **fmt.fixed,
        **fmt.select,
    }
    for ours, peft in fmt.fields.items():
        value = getattr(exported, ours)
        peft_config[peft] = peft_number(value) if ours in fmt.patterns else value
    for ours, (peft, to_peft, _) in fmt.values.items():
        value = getattr(exported, ours)
        if value not in to_peft:
            raise ExportError(f"config field {ours}={value!r} has no PEFT {fmt.peft_type} equivalent")
        peft_config[peft] = to_peft[value]
    if fmt.fan_in_fan_out:
        peft_config["fan_in_fan_out"] = any(format_kind(v) == "conv1d" for v in views.values())
    for ours, pattern in fmt.patterns.items():
        peft_config[pattern] = {
            re.escape(p): peft_number(getattr(c, ours))
            for p, c in configs.items()
            if getattr(c, ours) != getattr(exported, ours)
        }
    if fmt.adjust is not None:
        fmt.adjust(peft_config)
    return peft_config


def check_overrides(config: AdapterConfig, fmt: PeftFormat) -> None:
    """Refuse per-module overrides of a field PEFT cannot vary per module."""
    for key, changes in config.overrides.items():
        other = sorted(f for f in changes if f not in fmt.patterns and changes[f] != getattr(config, f))
        if other:
            raise ExportError(
                f"config field {other[0]}={changes[other[0]]!r} (an override of {key!r}) has no PEFT "
                f"{fmt.peft_type} equivalent: overrides[{key!r}] sets {other} per module; PEFT can only vary "
                f"{sorted(fmt.patterns)} per module"
            )


def _pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern whose regex matches the end of the module path."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return value
    return default


def _fit(hint: Any, value: Any) -> Any:
    """A JSON value for a config field annotated ``hint``: an int where a float is expected becomes a float."""
    if isinstance(value, int) and not isinstance(value, bool) and float in (hint, *typing.get_args(hint)):
        return float(value)
    return value


def config_from_peft(
    fmt: PeftFormat,
    config_class: type[AdapterConfig],
    raw: dict[str, Any],
    views: dict[str, BaseView],
    **common: Any,
) -> AdapterConfig:
    """The peftkit config (of ``config_class``) that the PEFT config ``raw`` means for the adapted layers
    ``views``; ``common`` are the fields PEFT writes another way (targets, ``modules_to_save``). Also used on
    export, to read our folder back as PEFT will.

    Raises:
        UnsupportedAdapterError: a value the entry's value maps do not carry.
        InvalidConfigError: the values do not make a valid config.
    """
    hints = typing.get_type_hints(config_class)
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    # a null PEFT value means "the default" unless the field takes None
    fields = {
        ours: raw[peft]
        for ours, peft in fmt.fields.items()
        if peft in raw and (raw[peft] is not None or type(None) in typing.get_args(hints[ours]))
    }
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
        default = fields.get(ours, defaults.get(ours))
        per_module = {p: _fit(hints[ours], _pattern_value(raw.get(pattern) or {}, p, default)) for p in views}
        fields[ours] = collections.Counter(per_module.values()).most_common(1)[0][0]
        for p, value in per_module.items():
            if value != fields[ours]:
                overrides.setdefault(p, {})[ours] = value
    fields = {k: _fit(hints[k], v) for k, v in fields.items()}
    return config_class(**common, **fields, overrides=overrides)


def exact_targets(paths: list[str], modules: dict[str, nn.Module]) -> list[str] | str:
    """The paths as suffix targets, or an exact regex where a path is also the suffix of another module."""
    clash = any(m != p and m.endswith("." + p) for p in paths for m in modules)
    return "|".join(re.escape(p) for p in paths) if clash else paths
