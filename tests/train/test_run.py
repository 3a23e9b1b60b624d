"""peftkit.train.run: the Python entry point of ``peftkit train`` / ``eval`` on a tiny Llama with a byte-level BPE
tokenizer and chat data: the run folder is self-contained and evaluating it (or a checkpoint) reproduces the
numbers logged in training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _tiny_lm import chat_rows, prompt_rows, save, write_jsonl

from peftkit.train.errors import CheckpointError
from peftkit.train.run import evaluate, load_trained, train

pytest.importorskip("transformers")
QUIET = {"progress": False, "log": lambda message: None}


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def chat_run(lm_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("chat")
    data = write_jsonl(root / "chat.jsonl", chat_rows(24))
    result = train(
        root / "run", model=str(lm_dir), data=str(data), task="causal-lm", r=4, alpha=8, lr=1e-2, epochs=2,
        batch_size=4, eval_every=3, save_every=4, log_every=1,
        overrides={"task.max_new_tokens": 2, "train.keep_checkpoints": None}, **QUIET,
    )  # fmt: skip
    return result


def test_run_folder_records_every_setting(chat_run, lm_dir: Path) -> None:
    out = chat_run.output_dir
    run = json.loads((out / "run.json").read_text())
    assert run["task"] == "causal-lm" and run["model"] == str(lm_dir.resolve()) and run["method"] == "lora"
    assert run["data"].endswith("chat.jsonl") and len(run["data_sha256"]) == 64 and run["seed"] == 0
    assert run["eval_fraction"] == 0.1 and (run["num_train"], run["num_eval"]) == (22, 2)
    assert run["method_options"]["targets"] == ["q_proj", "v_proj"] and run["method_options"]["r"] == 4
    assert run["train"]["lr"] == 1e-2 and run["train"]["seed"] == 0 and run["status"] == "complete"
    assert run["task_options"]["max_new_tokens"] == 2 and run["step"] == 12
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-12", "step-4", "step-6", "step-8"]


def test_metrics_jsonl_has_one_line_per_logged_step(chat_run) -> None:
    lines = [json.loads(line) for line in (chat_run.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 13))
    assert all({"step", "epoch", "loss", "lr", "grad_norm"} <= set(x) for x in lines)
    evaluated = [x["step"] for x in lines if "perplexity" in x]
    assert evaluated == [3, 6, 9, 12]  # every 3 steps; 6 and 12 end the epochs
    assert all({"eval_loss", "exact_match"} <= set(x) for x in lines if "perplexity" in x)
    assert lines[-1]["perplexity"] == chat_run.metrics["perplexity"]


def test_evaluating_the_run_and_a_checkpoint_reproduces_the_logged_numbers(chat_run) -> None:
    out = chat_run.output_dir
    metrics, count = evaluate(out, progress=False)
    assert count == 2 and metrics == chat_run.metrics
    logged = {x["step"]: x for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    metrics, _ = evaluate(out / "checkpoints" / "step-6", progress=False)
    assert metrics == {k: logged[6][k] for k in ("eval_loss", "perplexity", "exact_match")}


def test_load_trained_gives_the_trained_model(chat_run) -> None:
    model, tokenizer, spec = load_trained(chat_run.output_dir)
    ids = torch.tensor([tokenizer("Review: great")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, chat_run.model.eval()(input_ids=ids).logits)
    assert spec.task == "causal-lm"


def test_a_second_train_into_a_run_folder_is_refused(chat_run, lm_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="holds a run already: continue it with --resume"):
        train(chat_run.output_dir, model=str(lm_dir), data="x.jsonl", task="causal-lm", **QUIET)


def test_prompt_completion_data_with_packing_and_config_file(lm_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pc.jsonl", prompt_rows(30))
    config = tmp_path / "settings.yaml"
    config.write_text("train:\n  lr: 0.01\n  max_steps: 3\ntask:\n  packing: true\n  max_length: 32\nr: 2\n")
    result = train(tmp_path / "run", model=str(lm_dir), data=str(data), task="causal-lm", config=str(config),
                   overrides=["task.max_new_tokens=2", "batch_size=2"], **QUIET)  # fmt: skip
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (
        run["task_options"]["packing"] is True and run["train"]["batch_size"] == 2 and run["method_options"]["r"] == 2
    )
    assert result.train_result.global_step == 3 and "exact_match" in result.metrics
    assert any(note.startswith("packing: ") for note in result.notes)
