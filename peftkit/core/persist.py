"""Saving an adapted model's adapters into a folder and loading them back (the folder format is
:mod:`peftkit.core.io`; tensors reach adapter modules through :meth:`AdaptedModel.load_tensors`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import io
from .errors import AdapterFileError, InvalidConfigError
from .registry import get_method
from .state import check_fingerprint
from .version import __version__

if TYPE_CHECKING:
    from .model import AdaptedModel


def adapter_meta(model: AdaptedModel, name: str) -> dict[str, Any]:
    """``adapter.json`` of adapter ``name`` (without the tensor checksum, which the writer adds)."""
    config = model.configs[name]
    tensors = model.adapter_state_dict(name)
    return {
        "format": io.FORMAT,
        "format_version": io.FORMAT_VERSION,
        "peftkit_version": __version__,
        "name": name,
        "method": type(config).method,
        "config": config.to_dict(),
        "base_fingerprint": model.fingerprint(name),
        "num_tensors": len(tensors),
        "num_elements": sum(t.numel() for t in tensors.values()),
    }


def save(model: AdaptedModel, path: str | Path, names: str | Sequence[str] | None = None) -> Path:
    """Save adapters ``names`` (default: every adapter the model holds) into folder ``path``: one adapter into
    ``path`` itself, several into ``path/<name>/`` each with the index that :func:`load_into` reads. Files of
    other programs in ``path`` are left alone; peftkit's own files of an earlier save there are replaced."""
    if names is None:
        names = model.adapter_names
        if not names:
            raise model.no_adapters_error()
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        model.require(name)
    if len(set(names)) != len(names):
        raise InvalidConfigError(f"names lists an adapter twice: {names}")
    folder = io.prepare_folder(path)
    if len(names) == 1:
        return io.write_adapter(folder, adapter_meta(model, names[0]), model.adapter_state_dict(names[0]))
    for name in names:
        io.write_adapter(folder / name, adapter_meta(model, name), model.adapter_state_dict(name))
    return io.write_index(folder, names, [n for n in model.active_adapters if n in names])


def load_adapter(model: AdaptedModel, path: str | Path, name: str | None = None, activate: bool | None = None) -> str:
    """Load the saved adapter in folder ``path`` into ``model``; returns the name it was loaded under."""
    folder = Path(path)
    if (folder / io.INDEX_FILE).is_file() and not (folder / io.CONFIG_FILE).is_file():
        names = io.read_index(folder)["adapters"]
        raise AdapterFileError(
            f"{path} holds {len(names)} adapters ({', '.join(names)}): load one with "
            f"load_adapter({os.path.join(str(path), names[0])!r}), or all of them with pk.load(base, {str(path)!r})"
        )
    meta = io.read_meta(folder)
    check_fingerprint(model.model, meta["base_fingerprint"])
    method = get_method(meta["method"])
    try:
        config = method.config_class.from_dict(meta["config"])
    except (TypeError, InvalidConfigError) as exc:
        raise AdapterFileError(f"{path}: the saved config does not fit method {meta['method']!r}: {exc}") from None
    tensors = io.read_tensors(folder, meta)
    name = name or meta["name"]
    model.load_tensors(name, config, tensors, activate=activate, source=str(path), fingerprint=meta["base_fingerprint"])
    return name


def load_into(model: AdaptedModel, path: str | Path, name: str | None = None) -> None:
    """Load what :func:`save` wrote at ``path`` into ``model``: one adapter (made active, under ``name`` if
    given), or every adapter of a folder of several (in their saved order, the saved active ones active;
    ``name`` is then refused). All or nothing."""
    folder = Path(path)
    if not (folder / io.INDEX_FILE).is_file():
        model.load_adapter(folder, name=name, activate=True)
        return
    if name is not None:
        raise InvalidConfigError(f"{path} holds several adapters, each loaded under its saved name: drop name=")
    index = io.read_index(folder)
    loaded: list[str] = []
    try:
        for saved in index["adapters"]:
            loaded.append(model.load_adapter(folder / saved, activate=False))
    except BaseException:
        for done in loaded:
            model.delete_adapter(done)
        raise
    if index.get("active"):
        model.set_adapter(index["active"])
