"""AdapterConfig: per-module overrides."""

from __future__ import annotations

import pytest
from conftest import tiny_bert

import peftkit as pk


def test_overrides_give_modules_their_own_settings(tmp_path) -> None:
    cfg = pk.LoRAConfig(
        r=2,
        alpha=4.0,
        targets=["query", "value"],
        overrides={"value": {"r": 4}, "encoder.layer.1.attention.self.value": {"r": 3, "alpha": 3.0}},
    )
    model = pk.adapt(tiny_bert(), cfg)
    shapes = {p: (m.A.shape[0], m.scale) for p, m in model.adapter_modules("default").items()}
    assert shapes == {
        "encoder.layer.0.attention.self.query": (2, 2.0),
        "encoder.layer.0.attention.self.value": (4, 1.0),  # suffix match; alpha stays 4
        "encoder.layer.1.attention.self.query": (2, 2.0),
        "encoder.layer.1.attention.self.value": (3, 1.0),  # the exact path wins over the suffix
    }
    model.save(tmp_path / "a")
    loaded = pk.load(tiny_bert(), tmp_path / "a")
    assert {p: (m.A.shape[0], m.scale) for p, m in loaded.adapter_modules("default").items()} == shapes
    assert loaded.configs["default"] == cfg


def test_overrides_are_checked_when_the_config_is_made() -> None:
    with pytest.raises(pk.errors.InvalidConfigError, match=r"overrides\['query'\].*r must lie in \[1, inf\), got 0"):
        pk.LoRAConfig(overrides={"query": {"r": 0}})
    with pytest.raises(pk.errors.InvalidConfigError, match=r"sets \['targets'\], which cannot vary per module"):
        pk.LoRAConfig(overrides={"query": {"targets": ["key"]}})
    with pytest.raises(pk.errors.InvalidConfigError, match=r"sets \['rank'\]"):
        pk.LoRAConfig(overrides={"query": {"rank": 4}})
