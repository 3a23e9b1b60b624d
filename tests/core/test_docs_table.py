"""docs/methods.md is generated from the registry and must stay current (`make docs` regenerates it)."""

import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_methods_table_is_current() -> None:
    table = runpy.run_path(str(ROOT / "scripts" / "methods_table.py"))["table"]()
    assert (ROOT / "docs" / "methods.md").read_text() == table, "docs/methods.md is stale: run `make docs`"
