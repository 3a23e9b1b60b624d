"""The conformance suite: every registered method × its tiny variants × every layer kind it supports ×
every generic check. A method gets all of this by registering; its ``exempt`` dict is the only way out."""

from __future__ import annotations

import pytest
from _harness import CHECKS, EXEMPTIONS, KINDS, Combo, combos
from _throwaway_methods import THROWAWAY, registered

import peftkit as pk

pytestmark = pytest.mark.usefixtures("one_thread")

COMBOS = [c for method in pk.list_methods() for c in combos(method)]


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("combo", [c for _, c in COMBOS], ids=[i for i, _ in COMBOS])
def test_conformance(combo: Combo, check: str, tmp_path) -> None:
    CHECKS[check](combo, tmp_path)


def test_every_method_is_covered() -> None:
    covered = {c.method for _, c in COMBOS}
    assert covered == set(pk.list_methods()), "a registered method supports none of the suite's layer kinds"
    for method in pk.list_methods():
        assert pk.get_method(method).config_class.tiny_variants(), f"{method}: tiny_variants() is empty"


def test_exemptions_are_known_and_justified() -> None:
    """``exempt`` keys must name a property the suite knows (a typo would silently exempt nothing)."""
    for method in pk.list_methods():
        for prop, reason in pk.get_method(method).exempt.items():
            assert prop in EXEMPTIONS, f"{method}: unknown exemption {prop!r}; the suite knows {sorted(EXEMPTIONS)}"
            assert isinstance(reason, str) and reason.strip(), f"{method}: exemption {prop!r} needs the spec's reason"


def test_unsupported_kinds_are_skipped_by_supports() -> None:
    """The combinations come from each method's ``supports``, with no table in the tests."""
    for method in pk.list_methods():
        cls = pk.get_method(method)
        kinds = {c.kind.id for _, c in combos(method)}
        for kind in KINDS:
            ok = all(cls.supports(m) for m in kind.target_modules(kind.base()))
            assert (kind.id in kinds) == ok


@pytest.mark.parametrize("name", sorted(THROWAWAY))
def test_new_method_gets_the_suite_by_registering(name: str, tmp_path) -> None:
    with registered(name):
        assert name in pk.list_methods()
        found = combos(name)
        assert found, f"{name} supports no layer kind"
        assert {c.kind.id for _, c in found} <= {"linear", "bert-linear", "gpt2-conv1d"}
        for cid, combo in found:
            for check, fn in CHECKS.items():
                sub = tmp_path / f"{cid}-{check}"
                sub.mkdir()
                fn(combo, sub)
    assert name not in pk.list_methods(), "the throwaway method leaked out of the registry"
    with pytest.raises(pk.errors.UnknownMethodError):
        pk.get_method(name)
