"""Methods by name. ``@register("name", Config)`` on an Adapter subclass is the only wiring a method needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import UnknownMethodError
from .protocol import Adapter, AdapterConfig

_METHODS: dict[str, type[Adapter]] = {}

A = TypeVar("A", bound=type[Adapter])


def register(name: str, config_class: type[AdapterConfig]) -> Callable[[A], A]:
    """Register an :class:`Adapter` subclass and its config under ``name``."""

    def wrap(adapter_class: A) -> A:
        if name in _METHODS and _METHODS[name] is not adapter_class:
            raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__qualname__}")
        adapter_class.method = name
        adapter_class.config_class = config_class
        config_class.method = name
        _METHODS[name] = adapter_class
        return adapter_class

    return wrap


def unregister(name: str) -> None:
    """Remove method ``name`` from the registry (for tests and plugins that register a method temporarily)."""
    _load_builtin_methods()
    if name not in _METHODS:
        raise UnknownMethodError(name, _METHODS)
    del _METHODS[name]


def get_method(name: str) -> type[Adapter]:
    """The Adapter class registered under ``name``; raises :class:`UnknownMethodError` naming close matches."""
    _load_builtin_methods()
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(name, _METHODS) from None


def method_of(config: AdapterConfig) -> type[Adapter]:
    """The Adapter class for a config instance."""
    return get_method(type(config).method)


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _load_builtin_methods()
    return sorted(_METHODS)


def get_config(name: str, **fields: Any) -> AdapterConfig:
    """A config of method ``name`` with the given fields (e.g. ``get_config("dora", r=4)``)."""
    return get_method(name).config_class(**fields)


def _load_builtin_methods() -> None:
    import peftkit.methods  # noqa: F401  (importing the package registers every method file)


@dataclass(frozen=True)
class MethodInfo:
    """What the registry knows about one method (for `peftkit methods` and docs/methods.md)."""

    name: str
    config: str
    layers: tuple[str, ...]
    mergeable: bool
    identity_at_init: bool
    summary: str


def describe_methods() -> list[MethodInfo]:
    """One :class:`MethodInfo` per registered method: supported layer kinds are probed with small sample
    modules through each method's own ``supports``; mergeability and identity come from its ``exempt``."""
    import sys

    from torch import nn

    layers: dict[str, nn.Module] = {
        "Linear": nn.Linear(8, 8),
        "Conv2d": nn.Conv2d(4, 4, 3),
        "Embedding": nn.Embedding(10, 8),
    }
    try:
        from transformers.pytorch_utils import Conv1D

        layers["GPT-2 Conv1D"] = Conv1D(8, 8)
    except ImportError:
        pass
    layers["Block (any module)"] = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))  # the weightless "module" kind
    infos = []
    for name in list_methods():
        cls = _METHODS[name]
        doc = sys.modules[cls.__module__].__doc__ or cls.__doc__ or ""
        paragraph = " ".join(doc.strip().split("\n\n")[0].split())
        infos.append(
            MethodInfo(
                name=name,
                config=cls.config_class.__name__,
                layers=tuple(kind for kind, module in layers.items() if cls.supports(module)),
                mergeable="mergeable" not in cls.exempt,
                identity_at_init="identity_at_init" not in cls.exempt,
                summary=paragraph if len(paragraph) <= 140 else paragraph[:139].rstrip() + "…",
            )
        )
    return infos
