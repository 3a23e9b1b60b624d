"""Bad input to ``peftkit train`` (issue 14): each is one line ``error: ...`` naming the problem, exit code 1, and
nothing is lost (no run folder is started, an existing run is untouched). Long sequences are not an error: they
are truncated with a count in the log."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from _tiny_lm import chat_rows, save, save_bert, write_jsonl
from typer.testing import CliRunner

from peftkit.cli import app

pytest.importorskip("transformers")
runner = CliRunner(env={"COLUMNS": "200"})
QUICK = ["--no-progress", "--max-steps", "2", "--batch-size", "4"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"lm": save(root / "lm"), "other": save(root / "other", context=64), "bert": save_bert(root / "bert")}


def error_line(args: list[str | Path]) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def causal(models: dict[str, Path], data: Path, out: Path) -> list[str | Path]:
    return ["train", "--model", models["lm"], "--data", data, "--task", "causal-lm", "--output-dir", out, *QUICK,
            "--set", "task.exact_match=false"]  # fmt: skip


def test_malformed_jsonl_line_is_named(models, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine"}\n\n{"text": "broken\n{"text": "fine"}\n')
    line = error_line(causal(models, data, tmp_path / "run"))
    assert line.startswith(f"error: {data}, line 3: not valid JSON (")
    assert not (tmp_path / "run").exists()  # nothing started


def test_a_line_that_is_not_an_object(models, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine"}\n["a", "list"]\n')
    assert (
        error_line(causal(models, data, tmp_path / "run"))
        == f"error: {data}, line 2: expected a JSON object, found list"
    )


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_file(models, tmp_path: Path, content: str) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(content)
    assert error_line(causal(models, data, tmp_path / "run")) == f"error: data file {data} is empty: it holds no rows"


def test_missing_columns_list_the_columns_found(models, tmp_path: Path) -> None:
    data = tmp_path / "d.csv"
    data.write_text("review,sentiment\ngood film,pos\nbad film,neg\n")
    line = error_line(["train", "--model", models["bert"], "--data", data, "--output-dir", tmp_path / "run", *QUICK])
    assert line == (
        f"error: {data}, line 2: missing columns 'text', 'label' (found: review, sentiment); set text_column= / "
        "label_column= to the names in your file"
    )
    # with the names set, the same file trains
    result = runner.invoke(app, ["train", "--model", str(models["bert"]), "--data", str(data), "--output-dir",
                                 str(tmp_path / "ok"), *QUICK, "--set", "text_column=review",
                                 "--set", "label_column=sentiment", "--set", "eval_fraction=0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ok" / "run.json").read_text())["task_options"]["labels"] == ["neg", "pos"]


def test_causal_lm_row_without_known_columns(models, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"input": "a", "output": "b"}])
    assert error_line(causal(models, data, tmp_path / "run")) == (
        f"error: {data}, line 2: a causal-lm row needs 'text', 'prompt' and 'completion', or 'messages' "
        "(found: input, output)"
    )


def test_label_outside_the_label_set(models, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"},
                                              {"text": "so so", "label": "meh"}])  # fmt: skip
    args = ["train", "--model", models["bert"], "--data", data, "--output-dir", tmp_path / "run", *QUICK,
            "--set", 'labels=["neg", "pos"]']  # fmt: skip
    assert error_line(args) == f"error: {data}, line 3: label 'meh' is not in the label set (neg, pos)"


def test_chat_row_without_an_assistant_turn(models, tmp_path: Path) -> None:
    rows = chat_rows(4)
    rows[2] = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert error_line(causal(models, data, tmp_path / "run")) == (
        f"error: {data}, line 3: a chat row without an assistant turn (roles: system, user): nothing to train on"
    )


def test_long_sequences_are_truncated_with_a_count(models, tmp_path: Path) -> None:
    rows = [{"text": "word " * 200}, *({"text": f"short {i}"} for i in range(20)), {"text": "café " * 300}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    result = runner.invoke(app, [str(a) for a in causal(models, data, tmp_path / "run")] + ["--set", "eval_fraction=0"])
    assert result.exit_code == 0, result.output
    # the tiny model's context is 96 tokens: the 2 long rows are cut to it, and the log says so
    assert "max_length 1024 is above the model's context (96 tokens): using 96" in result.output
    assert "2 training examples were longer than 96 tokens and were truncated" in result.output


@pytest.fixture(scope="module")
def finished_run(models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("done")
    data = write_jsonl(root / "chat.jsonl", chat_rows(12))
    result = runner.invoke(app, [str(a) for a in causal(models, data, root / "run")])
    assert result.exit_code == 0, result.output
    return root / "run"


def _digest(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def test_resume_on_a_folder_without_checkpoint(models, tmp_path: Path, finished_run: Path) -> None:
    assert error_line(["train", "--resume", tmp_path, "--no-progress"]) == (
        f"error: {tmp_path} is neither a run folder nor a checkpoint (no run.json; 'peftkit train' writes one)"
    )
    empty = tmp_path / "copy"
    empty.mkdir()
    (empty / "run.json").write_bytes((finished_run / "run.json").read_bytes())
    assert error_line(["train", "--resume", empty, "--no-progress"]) == (
        f"error: {empty} has no checkpoint to resume from ({empty / 'checkpoints'} holds none)"
    )


def test_resume_with_another_base_model(models, finished_run: Path) -> None:
    before = _digest(finished_run)
    line = error_line(["train", "--resume", finished_run, "--model", models["other"], "--no-progress"])
    assert line == (
        f"error: {finished_run} was trained on {models['lm'].resolve()}, not {models['other']}: resuming on another "
        "base model would not continue the run (drop --model)"
    )
    assert _digest(finished_run) == before  # nothing touched


def test_resume_when_the_base_model_folder_now_holds_other_weights(finished_run: Path, tmp_path: Path) -> None:
    # Same path, same architecture, other weights (a retrained or updated model): the adapter's shape
    # fingerprint cannot tell, the recorded weight digest does; nothing is written.
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    model = Path(json.loads((run / "run.json").read_text())["model"])
    shutil.copytree(model, tmp_path / "original")
    try:
        save(model, seed=1)
        before = _digest(run)
        assert error_line(["train", "--resume", run, "--no-progress"]) == (
            f"error: the base model {model} is not the one {run} was trained on (its weights differ): resuming "
            "would not continue the run"
        )
        assert _digest(run) == before
        line = error_line(["eval", run, "--no-progress"])
        assert line.endswith("its numbers would differ (pass --model to evaluate on it anyway)")
    finally:
        shutil.rmtree(model)
        shutil.copytree(tmp_path / "original", model)
