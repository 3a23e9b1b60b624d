"""Saved tensors into adapter modules, and whether a saved adapter fits a base model.

:func:`assign` is the one path from saved tensors (``<module path>.<tensor name>``, what saving writes) to
adapter modules: loading a folder, the serving engine and the PEFT import all go through it (by way of
:meth:`AdaptedModel.load_tensors`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import BaseView, layer_kind
from .errors import AdapterFileError, BaseModelMismatch
from .layer import AdaptedLayer
from .protocol import Adapter


def assign(modules: dict[str, Adapter], tensors: dict[str, Tensor], source: str) -> None:
    """Copy ``tensors`` into one adapter's ``modules`` (``{module path: Adapter}``).

    Each module's :meth:`Adapter.fit_state` sees its saved tensors first (methods whose structure changes while
    training reshape to them); then every tensor ``state_dict`` names must be in ``tensors`` with its shape.

    Raises:
        AdapterFileError: names or shapes do not match the modules (``source`` names where the tensors came from).
    """
    if any(type(a).fit_state is not Adapter.fit_state for a in modules.values()):
        per_module: dict[str, dict[str, Tensor]] = {p: {} for p in modules}
        for key, t in tensors.items():
            module_path, _, local = key.rpartition(".")
            while module_path and module_path not in per_module:  # keys of nested tensors: "A.0" under "x.y"
                module_path, _, head = module_path.rpartition(".")
                local = f"{head}.{local}"
            if module_path:
                per_module[module_path][local] = t
        for module_path, adapter in modules.items():
            adapter.fit_state(per_module[module_path])
    # tensors are copied straight into the parameters and buffers that ``state_dict`` names: ``load_state_dict``
    # without its per-module overhead
    expected = {
        f"{module_path}.{key}": t
        for module_path, adapter in modules.items()
        for key, t in adapter.state_dict(keep_vars=True).items()
    }
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(
            f"{source}: tensors do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for key, want in expected.items():
        if tensors[key].shape != want.shape:
            got, implied = tuple(tensors[key].shape), tuple(want.shape)
            raise AdapterFileError(f"{source}: tensor {key!r} has shape {got}, the config implies {implied}")
    with torch.no_grad():
        for key, want in expected.items():
            want.copy_(tensors[key])


def describe(module: nn.Module) -> dict[str, Any]:
    """What a saved adapter records of one adapted module (kind, type, shape; a block: its type)."""
    return BaseView(module).describe() if layer_kind(module) else {"type": type(module).__name__}


def _base_module(model: nn.Module, path: str) -> nn.Module | None:
    """The module at ``path`` as the user sees it (an ``AdaptedLayer`` counts as its base module), found by
    walking only that path (not the whole tree, so loading costs O(#adapted modules), not O(model))."""
    module = model
    for part in path.split(".") if path else []:
        if isinstance(module, AdaptedLayer):
            return None  # paths never lead inside a wrapper
        module = module._modules.get(part)  # type: ignore[assignment]
        if module is None:
            return None
    return module.base_layer if isinstance(module, AdaptedLayer) else module


def check_fingerprint(model: nn.Module, expected: dict[str, dict[str, Any]]) -> None:
    """Raise :class:`BaseModelMismatch` naming the first module that differs from a saved fingerprint
    (``{module path: describe(module)}``)."""
    for path, want in expected.items():
        module = _base_module(model, path)
        if module is None:
            raise BaseModelMismatch(
                f"the adapter was saved for a base model with a module {path!r}; this model has none"
            )
        got = describe(module)
        if got != want:
            raise BaseModelMismatch(
                f"module {path!r} differs from the base the adapter was saved for: saved {want}, found {got}"
            )
