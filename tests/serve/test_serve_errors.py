"""Serving's errors and its one adapter-name check (``peftkit.serve.errors``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import peftkit.serve
from peftkit.errors import AdapterNameError, InvalidConfigError, PeftkitError
from peftkit.serve.errors import AdapterLoadError, AdapterRankError, AdapterTooLargeError, check_adapter_name


@pytest.mark.parametrize("name", ["a", "run-1_v2", "x" * 128])
def test_valid_names(name: str) -> None:
    assert check_adapter_name(name) == name


@pytest.mark.parametrize("name", ["", "a.b", "a/b", "../x", "sp ace", "x" * 129, None, 3])
def test_invalid_names(name: object) -> None:
    with pytest.raises(AdapterNameError, match="invalid adapter name"):
        check_adapter_name(name)


def test_the_name_rule_is_written_once() -> None:
    """One adapter-name rule, in the core: no file of the serving package spells out the pattern, and only the
    registry (the cache) calls the check."""
    folder = Path(peftkit.serve.__file__).parent
    pattern = [f.name for f in folder.glob("*.py") if "A-Za-z0-9_" in f.read_text()]
    callers = [f.name for f in folder.glob("*.py") if re.search(r"check_adapter_name\(", f.read_text())]
    assert pattern == [] and sorted(callers) == ["cache.py"]
    core = Path(peftkit.core.__file__).parent
    assert [f.name for f in core.glob("*.py") if "A-Za-z0-9_" in f.read_text()] == ["model.py"]


def test_error_kinds() -> None:
    err = AdapterLoadError("ad", "broken")
    assert str(err) == "adapter 'ad' cannot be loaded: broken" and err.adapter == "ad"
    assert isinstance(AdapterTooLargeError("ad", "big"), AdapterLoadError)
    assert isinstance(AdapterRankError("r"), InvalidConfigError) and isinstance(err, (PeftkitError, ValueError))
