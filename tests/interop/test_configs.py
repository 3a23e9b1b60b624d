"""``peftkit.interop.configs``: PEFT's ``adapter_config.json`` <-> peftkit configs through a table entry."""

from __future__ import annotations

import pytest
from conftest import make_tiny_net

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.errors import ExportError
from peftkit.interop.configs import check_overrides, config_from_peft, exact_targets, to_peft_config
from peftkit.interop.formats import PEFT_FORMATS

NET = ["fc1", "fc2", "conv"]


def _views() -> dict[str, BaseView]:
    net = make_tiny_net()
    return {p: BaseView(net.get_submodule(p)) for p in NET}


@pytest.mark.parametrize(
    ("method", "kw"),
    [
        ("lora", dict(r=2, alpha=3.0, rslora=True, bias=True, overrides={"fc1": {"r": 4}, "conv": {"alpha": 5.0}})),
        ("dora", dict(r=3, alpha=6.0, dropout=0.1, overrides={"fc2": {"r": 1, "alpha": 2.0}})),
        ("lokr", dict(r=2, alpha=4.0, decompose_both=True, overrides={"fc1": {"r": 4}, "conv": {"alpha": 3.0}})),
    ],
)
def test_config_round_trips_per_module(method: str, kw: dict) -> None:
    """Our config -> PEFT's -> ours gives every module the same settings (overrides via rank/alpha patterns)."""
    fmt = PEFT_FORMATS[method]
    config = pk.get_config(method, targets=NET, **kw)
    views = _views()
    written = to_peft_config(fmt, config, {p: config.for_module(p) for p in views}, views, [], None, None)
    assert written["peft_type"] == fmt.peft_type and written["target_modules"] == sorted(NET)
    back = config_from_peft(fmt, type(config), written, views, targets=NET)

    def settings(c: pk.AdapterConfig) -> dict:
        return {k: v for k, v in c.to_dict().items() if k != "overrides"}

    for p in NET:
        assert settings(back.for_module(p)) == settings(config.for_module(p)), p


def test_import_takes_the_most_common_value_and_fills_defaults() -> None:
    """A pattern covering every module: the config gets the most common value and overrides only for the rest;
    an int alpha becomes a float, a null dropout the default."""
    raw = {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": None,
        "rank_pattern": {"fc1": 4, "fc2": 4, "conv": 2},
    }
    config = config_from_peft(PEFT_FORMATS["lora"], pk.LoRAConfig, raw, _views(), targets=NET)
    assert (config.r, config.alpha, config.dropout) == (4, 16.0, 0.0) and isinstance(config.alpha, float)
    assert config.overrides == {"conv": {"r": 2}}


def test_overrides_peft_cannot_vary_are_refused() -> None:
    config = pk.LoRAConfig(r=2, targets=NET, overrides={"fc1": {"dropout": 0.1}, "fc2": {"r": 3}})
    with pytest.raises(ExportError, match=r"dropout=0.1 \(an override of 'fc1'\) .* sets \['dropout'\] per module"):
        check_overrides(config, PEFT_FORMATS["lora"])
    check_overrides(pk.LoRAConfig(r=2, targets=NET, overrides={"fc2": {"r": 3}}), PEFT_FORMATS["lora"])


def test_exact_targets_uses_a_regex_only_when_a_path_is_another_modules_suffix() -> None:
    modules = {"fc1": None, "block.fc1": None, "fc2": None}
    assert exact_targets(["fc2"], modules) == ["fc2"]
    assert exact_targets(["fc1", "fc2"], modules) == r"fc1|fc2"
