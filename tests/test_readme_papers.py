"""The README's table of papers points at things that exist: every path is a file in the repository and every
name in its second column of a row whose code is a method file is in the registry."""

from __future__ import annotations

import re
from pathlib import Path

import peftkit as pk

ROOT = Path(__file__).resolve().parents[1]


def _rows() -> list[list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Papers and where they live", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # the first is the header


def test_the_table_lists_the_seed() -> None:
    assert len(_rows()) >= 75


def test_every_path_in_the_table_exists() -> None:
    missing = [
        path
        for row in _rows()
        for cell in row[2:]
        for path in re.findall(r"`([\w./-]+\.(?:py|cpp))`", cell)
        if not (ROOT / path).is_file()
    ]
    assert not missing, f"README papers table names files that do not exist: {missing}"


def test_every_method_name_in_the_table_is_registered() -> None:
    registered = set(pk.list_methods())
    named = {name for row in _rows() if "peftkit/methods/" in row[2] for name in re.findall(r"`([a-z0-9_]+)`", row[1])}
    assert named, "no method names found in the table"
    assert named <= registered, f"not registered: {sorted(named - registered)}"
