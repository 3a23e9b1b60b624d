"""Finding target modules and swapping ``AdaptedLayer`` wrappers in (and out)."""

from __future__ import annotations

import re
from collections.abc import Iterator

from torch import nn

from .base import BaseView, layer_kind
from .config import AdapterConfig, is_name_suffix
from .errors import InvalidConfigError, TargetModuleNotFound, UnsupportedLayerError
from .layer import AdaptedLayer, Routing
from .protocol import Adapter

# Output heads that "all-linear" leaves alone (PEFT leaves out the output embedding; we also leave out
# the usual names of classification heads, which a task trains whole through ``modules_to_save``).
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "head", "output_head", "cls"})


def base_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of the model as the user sees it: an ``AdaptedLayer`` counts as its base module."""
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, AdaptedLayer):
            yield path, child.base_layer
        else:
            yield path, child
            yield from base_modules(child, path)


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def _matches(patterns: list[str] | str, name: str) -> bool:
    """A list (or a plain name, see :func:`is_name_suffix`) matches module-name suffixes; any other string is
    a regular expression over the full module name."""
    if isinstance(patterns, str):
        if not is_name_suffix(patterns):
            return re.fullmatch(patterns, name) is not None
        patterns = [patterns]
    return any(name == p or name.endswith("." + p) for p in patterns)


def _is_output_head(model: nn.Module, name: str, module: nn.Module) -> bool:
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    return module is out_emb or name.rsplit(".", 1)[-1] in HEAD_NAMES


def find_targets(model: nn.Module, config: AdapterConfig, method: type[Adapter]) -> list[str]:
    """Names of the modules ``config`` targets, checked against what ``method`` supports.

    Raises:
        TargetModuleNotFound: a listed target (or the regex) matches nothing; the message lists close names.
        UnsupportedLayerError: a target matches a module the method cannot adapt.
    """
    modules = dict(base_modules(model))
    targets = config.targets
    if targets == "all-linear":
        found = [n for n, m in modules.items() if layer_kind(m) == "linear" and not _is_output_head(model, n, m)]
        if not found:
            raise TargetModuleNotFound("all-linear", modules)
    elif isinstance(targets, str):
        found = [n for n in modules if _matches(targets, n)]
        if not found:
            raise TargetModuleNotFound(targets, modules, regex=not is_name_suffix(targets))
    else:
        hits_of = {target: [n for n in modules if _matches([target], n)] for target in targets}
        for target, hits in hits_of.items():
            if not hits:
                raise TargetModuleNotFound(target, modules)
        # in model order, as PEFT builds them (seeded inits then draw in the same order)
        chosen = {n for hits in hits_of.values() for n in hits}
        found = [n for n in modules if n in chosen]
    if config.exclude:
        found = [n for n in found if not _matches(config.exclude, n)]
    save = set(named_modules_to_save(model, config))
    found = [n for n in found if n not in save]
    for name in found:
        if not method.supports(modules[name]):
            raise UnsupportedLayerError(
                f"method {method.method!r} cannot adapt {name!r} ({type(modules[name]).__name__}); "
                "narrow `targets` or `exclude` it"
            )
    return found


def named_modules_to_save(model: nn.Module, config: AdapterConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    modules = dict(base_modules(model))
    names: list[str] = []
    for target in config.modules_to_save:
        hits = [n for n in modules if _matches([target], n) and layer_kind(modules[n]) is not None]
        if not hits:
            raise TargetModuleNotFound(target, modules)
        names += hits
    return names


def submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` without its per-step checks (a hot path when adding and loading adapters)."""
    module = model
    for part in path.split(".") if path else ():
        child = module._modules.get(part)
        if child is None:
            return model.get_submodule(path)  # raises the usual AttributeError
        module = child
    return module


def wrap(model: nn.Module, path: str, routing: Routing) -> AdaptedLayer:
    """The ``AdaptedLayer`` at ``path``, creating it (and swapping it in) if the module is not wrapped yet."""
    module = submodule(model, path)
    if isinstance(module, AdaptedLayer):
        return module
    layer = AdaptedLayer(module, routing)
    parent_path, _, child = path.rpartition(".")
    setattr(submodule(model, parent_path) if parent_path else model, child, layer)
    return layer


def unwrap(model: nn.Module, path: str) -> None:
    """Put the base module back in place of the ``AdaptedLayer`` at ``path``."""
    layer = submodule(model, path)
    parent_path, _, child = path.rpartition(".")
    setattr(submodule(model, parent_path) if parent_path else model, child, layer.base_layer)


def base_view(module: nn.Module) -> BaseView:
    """The view adapters of ``module`` are built on: its wrapper's, once wrapped.

    Raises:
        UnsupportedLayerError: a block that contains wrapped layers (wrappers never nest).
    """
    if isinstance(module, AdaptedLayer):
        return module.base
    view = BaseView(module)
    if view.kind == "module" and any(isinstance(m, AdaptedLayer) for m in module.modules()):
        raise UnsupportedLayerError(
            f"cannot wrap a {type(module).__name__} that contains wrapped layers (wrappers never nest); "
            "add the block-level adapter first, or target its layers instead"
        )
    return view


def build_adapter(method: type[Adapter], base: BaseView, config: AdapterConfig, path: str) -> Adapter:
    """Instantiate ``method`` for one base module, on the base's device and dtype."""
    try:
        adapter = method(base, config)
    except (InvalidConfigError, UnsupportedLayerError) as exc:
        raise type(exc)(f"{path}: {exc}") from None
    dtype = base.dtype if base.dtype.is_floating_point else None
    tensors = [*adapter.parameters(), *adapter.buffers()]
    if all(t.device == base.device and (dtype is None or t.dtype == dtype) for t in tensors):
        return adapter  # already in place (the common case): skip Module.to's walk
    return adapter.to(device=base.device, dtype=dtype)
