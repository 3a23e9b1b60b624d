"""The optimizer through the run entry points: ``peftkit.train.run.train(optim=...)`` and ``peftkit train
--optim NAME`` (options with ``--set optim_options=...``) record the optimizer class they trained with in
run.json; an unknown name is a usage error before anything is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _tiny_lm import BERT_WORDS, save_bert, write_jsonl
from typer.testing import CliRunner

from peftkit.cli import app
from peftkit.train.run import train

pytest.importorskip("transformers")
runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def bert_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("optim-cli")
    words = BERT_WORDS[:20]
    rows = [{"text": " ".join(words[i % 20 : i % 20 + 4]), "label": "pos" if i % 2 else "neg"} for i in range(24)]
    return save_bert(root / "bert"), write_jsonl(root / "data.jsonl", rows)


def test_python_entry_point_records_the_optimizer(bert_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = bert_and_data
    result = train(
        tmp_path / "run", model=str(model), data=str(data), method="full", targets="query,value", optim="galore",
        max_steps=2, batch_size=8, max_length=8, progress=False, log=lambda m: None,
        overrides={"optim_options": {"rank": 4, "update_proj_gap": 2}},
    )  # fmt: skip
    run = json.loads((result.output_dir / "run.json").read_text())
    assert run["optimizer"] == "peftkit.optim.galore.GaLoreAdamW"
    assert run["train"]["optim"] == "galore" and run["train"]["optim_options"] == {"rank": 4, "update_proj_gap": 2}


def test_cli_optim_option(bert_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = bert_and_data
    args = ["train", "--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / "run"),
            "--max-steps", "2", "--batch-size", "8", "--max-length", "8", "--no-progress",
            "--optim", "loraplus", "--set", 'optim_options={"ratio": 8}']  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["optimizer"] == "torch.optim.adamw.AdamW"  # LoRA+ is AdamW with its groups
    assert run["train"]["optim"] == "loraplus" and run["train"]["optim_options"] == {"ratio": 8}


def test_cli_unknown_optimizer_is_a_usage_error(bert_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = bert_and_data
    args = ["train", "--model", str(model), "--data", str(data), "--output-dir", str(tmp_path / "run"),
            "--optim", "adam"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert "Invalid value for '--optim'" in result.stderr
    assert "unknown optimizer 'adam'; choose one of adamw, adamw8bit, galore, lorapro" in result.stderr
    assert not (tmp_path / "run").exists()
