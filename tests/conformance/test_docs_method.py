"""The complete method shown in ``docs/adding_a_method.md`` runs as written: it registers and passes every
conformance check (so the guide's ~60 lines really are a whole method, using only ``peftkit.core.api``)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
from _harness import CHECKS, combos

import peftkit as pk

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "adding_a_method.md"


def _method_code() -> str:
    block = re.search(r"```python\n(.*?)```", GUIDE.read_text(), re.S)
    assert block is not None, "the guide lost its code block"
    return "\n".join(line[3:] if line.startswith("   ") else line for line in block.group(1).splitlines())


def test_guide_method_uses_only_the_method_api() -> None:
    code = _method_code()
    imports = re.findall(r"^from (peftkit[\w.]*) import", code, re.M)
    assert imports == ["peftkit.core.api"]
    assert 40 <= len([line for line in code.splitlines() if line.strip()]) <= 70


@pytest.fixture
def guide_method():
    module = types.ModuleType("_guide_method")
    sys.modules[module.__name__] = module  # dataclasses resolve the module's annotations through sys.modules
    try:
        exec(compile(_method_code(), str(GUIDE), "exec"), module.__dict__)
        yield "minilora"
    finally:
        sys.modules.pop(module.__name__, None)
        if "minilora" in pk.list_methods():
            pk.core.registry.unregister("minilora")


def test_guide_method_passes_the_conformance_suite(guide_method: str, tmp_path) -> None:
    found = combos(guide_method)
    assert {c.kind.id for _, c in found} == {"linear", "bert-linear", "gpt2-conv1d"}
    for cid, combo in found:
        for check, fn in CHECKS.items():
            folder = tmp_path / f"{cid}-{check}"
            folder.mkdir()
            fn(combo, folder)
