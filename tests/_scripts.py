"""The repository's scripts (``examples/``, ``benchmarks/``) imported as modules by their tests: those folders are
not packages."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """Import ``ROOT/relative`` (e.g. ``"examples/demo_llm.py"``) as the module named by its file's stem."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


def parameter_count(module: nn.Module) -> int:
    """Every parameter of ``module``, trainable or not."""
    return sum(p.numel() for p in module.parameters())
