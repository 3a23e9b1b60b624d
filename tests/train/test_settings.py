"""peftkit.train.settings: --set / --config keys reach the run, TrainConfig, the task options and the method
config, with clear errors for unknown, ambiguous or run-time keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.train.run import settings_from
from peftkit.train.settings import RunSpec, build_spec, parse_assignments, parse_value, read_config_file

FIELDS = {"task_fields": ["max_length", "packing"], "method_fields": ["r", "alpha", "targets", "seed", "dropout"]}


def test_values_parse_as_json_or_text() -> None:
    assert [parse_value(v) for v in ("3", "1e-4", "true", "null", "[1, 2]", "q_proj,v_proj", "all-linear")] == [
        3, 1e-4, True, None, [1, 2], "q_proj,v_proj", "all-linear"
    ]  # fmt: skip
    assert parse_assignments(["lr=1e-4", " method.r = 16 "]) == {"lr": 1e-4, "method.r": 16}
    with pytest.raises(ValueError, match=r"--set 'lr': expected key=value"):
        parse_assignments(["lr"])


def test_bare_and_qualified_keys_find_their_section() -> None:
    spec = build_spec({"lr": 1e-4, "max_length": 64, "r": 16, "method.seed": 3, "train.seed": 4, "seed": 5,
                       "targets": "q_proj, v_proj", "model": "m"}, **FIELDS)  # fmt: skip
    assert spec.train == {"lr": 1e-4, "seed": 4} and spec.task_options == {"max_length": 64}
    assert spec.method_options == {"r": 16, "seed": 3, "targets": ["q_proj", "v_proj"]}
    assert (spec.seed, spec.model) == (5, "m")


def test_unknown_ambiguous_and_runtime_keys_are_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown setting 'lrr' \(did you mean lr"):
        build_spec({"lrr": 1}, **FIELDS)
    with pytest.raises(ValueError, match=r"unknown setting 'method.alhpa' \(did you mean method.alpha"):
        build_spec({"method.alhpa": 1}, **FIELDS)
    with pytest.raises(ValueError, match=r"setting 'dropout' is ambiguous: write task.dropout or method.dropout"):
        build_spec({"dropout": 0.1}, task_fields=["dropout"], method_fields=["dropout"])
    with pytest.raises(ValueError, match="'output_dir' is set by the run itself"):
        build_spec({"output_dir": "x"}, **FIELDS)


def test_config_files_json_and_yaml(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text('{"train": {"lr": 0.001}, "r": 4, "task": "causal-lm"}')
    (tmp_path / "c.yaml").write_text("method:\n  r: 4\ntask: causal-lm\nlr: 0.001\n")
    assert read_config_file(tmp_path / "c.json") == {"train.lr": 0.001, "r": 4, "task": "causal-lm"}
    assert read_config_file(tmp_path / "c.yaml") == {"method.r": 4, "task": "causal-lm", "lr": 0.001}
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml is not valid YAML"):
        read_config_file(tmp_path / "bad.yaml")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="must hold a mapping of settings, found list"):
        read_config_file(tmp_path / "list.json")
    with pytest.raises(ValueError, match=r"a config file is \.json, \.yaml or \.yml"):
        read_config_file(tmp_path / "c.toml")


def test_precedence_config_then_named_options_then_set(tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text('{"lr": 0.1, "r": 2, "batch_size": 4, "method.dropout": 0.3}')
    spec = settings_from(config=config, overrides={"lr": 0.3}, lr=0.2, r=6)
    assert spec.train["lr"] == 0.3 and spec.method_options["r"] == 6 and spec.train["batch_size"] == 4
    assert spec.method_options["dropout"] == 0.3 and spec.train["seed"] == 0 and spec.train["log_every"] == 10
    # the built-in data keeps the demo's sample counts; a user's file uses all of it
    assert (spec.max_train_samples, spec.max_eval_samples) == (3000, 1000)
    assert settings_from(data="x.jsonl", task="causal-lm").max_train_samples is None
    assert settings_from(task="causal-lm").train["lr"] == 2e-4 and settings_from().train["lr"] == 2e-3


def test_task_options_are_checked_up_front() -> None:
    with pytest.raises(ValueError, match=r"unknown setting 'packing'"):
        settings_from(overrides={"packing": True})  # a causal-lm option on the classify task
    with pytest.raises(TypeError, match="unknown option"):
        settings_from(rank=3)


def test_run_spec_round_trips() -> None:
    spec = settings_from(task="causal-lm", data="d.jsonl", r=4)
    assert RunSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="unknown run settings"):
        RunSpec.from_dict({"nope": 1})
