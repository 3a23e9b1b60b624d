"""Saving an adapted model's adapters into a folder and loading them back (the folder format is
:mod:`peftkit.core.io`; tensors reach adapter modules through :meth:`AdaptedModel.load_tensors`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from . import io, state
from .config import AdapterConfig
from .errors import AdapterFileError, BaseModelMismatch, InvalidConfigError
from .protocol import skip_init
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


class Persistence:
    """Saving and loading on :class:`~peftkit.core.model.AdaptedModel` (a base class of it): the methods call
    this file's functions and :mod:`peftkit.core.state`, the one path from tensors to adapters."""

    def save(self: AdaptedModel, path: str | Path, names: str | Sequence[str] | None = None) -> Path:
        """Save adapters (default: every adapter the model holds, as PEFT's ``save_pretrained`` does) into the
        folder ``path``: one adapter as ``adapter.json`` + ``adapter.safetensors`` in ``path``, several as one
        sub-folder each plus an index that :func:`peftkit.load` reads back. Only these files are written; other
        files in ``path`` are left alone. Returns the folder."""
        return save(self, path, names)

    def load_adapter(
        self: AdaptedModel, path: str | Path, name: str | None = None, *, activate: bool | None = None
    ) -> str:
        """Load a saved adapter into this model under ``name`` (default: the name it was saved with)."""
        return load_adapter(self, path, name=name, activate=activate)

    def load_tensors(
        self: AdaptedModel,
        name: str,
        config: AdapterConfig,
        tensors: dict[str, Tensor],
        *,
        activate: bool | None = None,
        source: str = "the given tensors",
        fingerprint: dict[str, Any] | None = None,
    ) -> None:
        """Add adapter ``name`` built from ``config`` with the values ``tensors`` (keyed ``<module path>.<tensor
        name>``, as :meth:`adapter_state_dict` gives them): the one path from saved tensors to an adapter (loading,
        serving, the PEFT import). No initial values are drawn (every saved tensor is overwritten). All or
        nothing: on any error the adapter is removed again.

        Args:
            fingerprint: the modules the tensors were saved for (``{path: ...}``); their paths must be exactly
                the ones ``config`` selects on this model.

        Raises:
            AdapterFileError: tensor names or shapes do not match what ``config`` builds (naming ``source``).
            BaseModelMismatch: ``config`` selects other modules than ``fingerprint`` lists.
        """
        with skip_init():
            self.add_adapter(name, config, activate=activate)
        try:
            if fingerprint is not None and sorted(self.layer_paths[name]) != sorted(fingerprint):
                raise BaseModelMismatch(
                    f"on this model the adapter's targets select {len(self.layer_paths[name])} modules, "
                    f"but it was saved for {len(fingerprint)}"
                )
            self.assign_tensors(name, tensors, source=source)
        except BaseException:
            self.delete_adapter(name)
            raise

    def assign_tensors(
        self: AdaptedModel, name: str, tensors: dict[str, Tensor], *, source: str = "the given tensors"
    ) -> None:
        """Overwrite every tensor of adapter ``name`` with ``tensors`` (see :meth:`load_tensors`; a server reuses
        an evicted adapter's modules this way).

        Raises:
            AdapterFileError: tensor names or shapes do not match the adapter (naming ``source``).
        """
        state.assign(self.adapter_modules(name), tensors, source)

    def fingerprint(self: AdaptedModel, name: str) -> dict[str, dict[str, Any]]:
        """Names, kinds and shapes of the modules adapter ``name`` adapts (what a compatible base must have)."""
        return {path: state.describe(self._layer(path).base_layer) for path in self.layer_paths[name]}
