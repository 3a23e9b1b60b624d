"""Saving and loading a compressed causal LM whose layer shapes its configuration cannot describe.

LoRD and PELA replace Linears by two thin ones (:class:`~peftkit.compress.arch.FactoredLinear`) and LoRAPrune
removes attention heads and MLP channels from some blocks only: ``transformers``' ``Auto*`` classes would build
the original shapes and refuse (or, worse, re-initialise) the weights. A folder written by :func:`save_compressed`
therefore holds

    config.json              the original architecture's configuration (``AutoConfig`` reads it)
    compressed.json          the method, and the shape of every Linear / factorised Linear (``arch.describe``)
    compressed.safetensors   the weights (no ``model.safetensors``: ``AutoModel*.from_pretrained`` fails loudly)
    tokenizer files          when a tokenizer is given

and :func:`load_compressed` builds the architecture from the configuration, swaps in modules of the recorded
shapes and loads the weights strictly (every key present, none left over).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.compress import arch
from peftkit.compress.errors import CompressError

SPEC_FILE = "compressed.json"
WEIGHTS_FILE = "compressed.safetensors"
FORMAT = 1


class CompressedFolderError(CompressError, OSError):
    """A folder that is not a compressed model written by :func:`save_compressed`, or whose files disagree."""


def shapes(model: nn.Module) -> dict[str, dict[str, object]]:
    """``{path: arch.describe(module)}`` of every Linear and factorised Linear (not the factors inside one)."""
    out: dict[str, dict[str, object]] = {}
    inside: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, arch.FactoredLinear):
            inside.append(path)
            out[path] = arch.describe(module)
        elif isinstance(module, nn.Linear):
            out[path] = arch.describe(module)
    return out


def save_compressed(
    model: nn.Module, path: str | Path, tokenizer: Any = None, *, method: str, info: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` (a Hugging Face model with a ``config``, compressed in place) to the folder ``path``."""
    from safetensors.torch import save_model

    if not hasattr(model, "config"):
        raise CompressError("save_compressed needs a Hugging Face model (with a .config) to rebuild it later")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    dtype = next(model.parameters()).dtype
    spec = {"format": FORMAT, "method": method, "dtype": str(dtype).removeprefix("torch."), "modules": shapes(model),
            "info": info or {}, "load_with": "peftkit.compress.saving.load_compressed(folder)"}  # fmt: skip
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=1))
    save_model(model, str(folder / WEIGHTS_FILE))  # handles tied embeddings (shared tensors)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def load_compressed(path: str | Path) -> nn.Module:
    """The model saved by :func:`save_compressed` at ``path`` (eval mode).

    Raises:
        CompressedFolderError: ``compressed.json`` or the weights are missing, or a weight does not fit.
    """
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path)
    spec_file, weights = folder / SPEC_FILE, folder / WEIGHTS_FILE
    if not spec_file.is_file() or not weights.is_file():
        raise CompressedFolderError(
            f"{folder} is not a compressed model folder: it needs {SPEC_FILE} and {WEIGHTS_FILE} "
            "(written by peftkit compress / save_compressed)"
        )
    spec = json.loads(spec_file.read_text())
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=getattr(torch, spec.get("dtype", "float32")))
    have = shapes(model)
    for module_path, module_spec in spec["modules"].items():
        if have.get(module_path) != module_spec:
            arch.replace(model, module_path, arch.build(module_spec).to(getattr(torch, spec.get("dtype", "float32"))))
    try:
        load_model(model, str(weights), strict=True)
    except RuntimeError as exc:
        raise CompressedFolderError(f"{weights} does not fit {spec_file}: {' '.join(str(exc).split())}") from exc
    return model.eval()
