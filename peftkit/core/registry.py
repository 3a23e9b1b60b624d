"""Methods by name. ``@register("name", Config)`` on an Adapter subclass is the only wiring a method needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .config import AdapterConfig
from .errors import InvalidConfigError, UnknownMethodError
from .protocol import Adapter, Initializer

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
    if name not in _METHODS:
        raise UnknownMethodError(name, _METHODS)
    del _METHODS[name]


def get_method(name: str) -> type[Adapter]:
    """The Adapter class registered under ``name``; raises :class:`UnknownMethodError` naming close matches."""
    try:
        return _METHODS[name]
    except KeyError:
        raise UnknownMethodError(name, _METHODS) from None


def method_of(config: AdapterConfig) -> type[Adapter]:
    """The Adapter class for a config instance."""
    return get_method(type(config).method)


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_METHODS)


def get_config(name: str, **fields: Any) -> AdapterConfig:
    """A config of method ``name`` with the given fields (e.g. ``get_config("dora", r=4)``)."""
    return get_method(name).config_class(**fields)


# ------------------------------------------------------------------------------------------ initialisers
_INIT_RESOLVERS: list[Callable[[str], Initializer | None]] = []


def register_init_names(resolve: Callable[[str], Initializer | None]) -> None:
    """Let ``init="<name>"`` (in :meth:`AdaptedModel.add_adapter`) name an initialiser: ``resolve(name)`` returns
    one, or ``None`` for names it does not know. :mod:`peftkit.init` registers its names here."""
    if resolve not in _INIT_RESOLVERS:
        _INIT_RESOLVERS.append(resolve)


def initializer(init: Initializer | str) -> Initializer:
    """An :class:`Initializer` from an object or a registered name.

    Raises:
        InvalidConfigError: an unknown name, or an object without ``prepare`` and ``apply``.
    """
    if isinstance(init, str):
        for resolve in _INIT_RESOLVERS:
            found = resolve(init)
            if found is not None:
                return found
        raise InvalidConfigError(
            f"unknown init {init!r}: use 'pissa', 'pissa_niter_<K>', or an initialiser object such as "
            "pk.init.LoRAGA(batches), pk.init.LoKU(forget, retain) or pk.init.LoRASB(batches, total_steps=...)"
        )
    if not isinstance(init, Initializer):
        raise InvalidConfigError(f"init must be a name or have prepare(config) and apply(model, name), got {init!r}")
    return init


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
