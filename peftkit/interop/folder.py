"""Hugging Face PEFT adapter folders on disk: ``adapter_config.json`` and ``adapter_model.safetensors``.

Writing goes through :func:`peftkit.core.io.write_files` (each file replaced atomically, the tensors first, so
a kill in between leaves the old config, never a config without its tensors; other files in the folder stay).
Reading refuses pickle-only folders (``adapter_model.bin``): peftkit does not unpickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from peftkit.core.errors import AdapterFileError
from peftkit.core.io import read_json, safetensors_bytes, write_files
from peftkit.core.version import __version__

__all__ = ["PEFT_CONFIG_FILE", "PEFT_WEIGHTS_FILE", "read_peft_config", "read_peft_tensors", "write_peft_folder"]

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


def write_peft_folder(path: str | Path, peft_config: dict[str, Any], tensors: dict[str, Tensor]) -> Path:
    """Write a PEFT folder's two files (``peft_config`` as JSON, ``tensors`` as safetensors); returns the folder."""
    weights = safetensors_bytes(tensors, {"format": "pt", "exported_by": f"peftkit {__version__}"})
    config = json.dumps(peft_config, indent=2, sort_keys=True).encode()
    return write_files(path, [(PEFT_WEIGHTS_FILE, weights), (PEFT_CONFIG_FILE, config)])


def read_peft_config(path: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of the PEFT folder ``path`` (a JSON object).

    Raises:
        AdapterFileError: the file is missing or does not hold a JSON object.
    """
    file = Path(path) / PEFT_CONFIG_FILE
    raw = read_json(file, f"{path} is not a PEFT adapter folder: {PEFT_CONFIG_FILE} is missing")
    return raw


def read_peft_tensors(path: str | Path) -> dict[str, Tensor]:
    """The tensors of the PEFT folder ``path`` (keys as PEFT wrote them).

    Raises:
        AdapterFileError: the tensor file is missing (only a pickled ``adapter_model.bin``, say), truncated or
            corrupted.
    """
    file = Path(path) / PEFT_WEIGHTS_FILE
    if not file.is_file():
        pickled = (Path(path) / "adapter_model.bin").is_file()
        extra = " (only adapter_model.bin is there: peftkit does not read pickle files)" if pickled else ""
        raise AdapterFileError(f"{path}: {PEFT_WEIGHTS_FILE} is missing{extra}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{file} is truncated or corrupted: {exc}") from None
