"""peftkit.train.config: TrainConfig's checks and what a run stores of it."""

from __future__ import annotations

import pytest

from peftkit.train.config import RUNTIME_FIELDS, TrainConfig, train_fields


@pytest.mark.parametrize(
    ("field", "value"),
    [("lr", 0.0), ("lr", float("nan")), ("warmup_ratio", 1.5), ("save_every", 0), ("eval_every", 1.5),
     ("keep_checkpoints", 0), ("log_every", True), ("max_steps", -1)],
)  # fmt: skip
def test_bad_settings_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_to_dict_holds_json_values_without_runtime_fields() -> None:
    cfg = TrainConfig(betas=[0.8, 0.9], output_dir="x", device="cpu")
    data = cfg.to_dict()
    assert data["betas"] == [0.8, 0.9] and cfg.betas == (0.8, 0.9)
    assert not set(RUNTIME_FIELDS) & set(data) and sorted(data) == sorted(train_fields())
    assert TrainConfig(**{**data, "betas": tuple(data["betas"])}).to_dict() == data
