"""Methods by name. ``@register("name", Config)`` on an Adapter subclass is the only wiring a method needs."""

from __future__ import annotations

from collections.abc import Callable
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
