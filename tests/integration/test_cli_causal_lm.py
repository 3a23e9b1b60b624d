"""``peftkit train --task causal-lm`` end to end on a tiny Llama: the run's adapter is served by the serving
engine (what ``peftkit serve`` runs), merges into a folder ``AutoModelForCausalLM`` loads, and exports to a PEFT
folder plain ``PeftModel.from_pretrained`` loads, all with the trained model's outputs.

Before: the CLI trained only the MiniLM sentence classifier, whose adapter ``peftkit serve`` (a causal LM
server) could not use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _cli import invoke
from _tiny_lm import chat_rows, save, write_jsonl

from peftkit.train.run import load_trained

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lm")
    model = save(root / "tiny")
    data = write_jsonl(root / "chat.jsonl", chat_rows(24))
    output = invoke("train", "--model", model, "--data", data, "--task", "causal-lm",
                    "--output-dir", root / "runs" / "rt", "--r", 4, "--alpha", 8, "--lr", 5e-2, "--max-steps", 6,
                    "--batch-size", 4, "--no-progress", "--set", "task.max_new_tokens=3")  # fmt: skip
    assert "held-out perplexity: " in output and "exact_match: " in output and "on 2 examples" in output
    return root / "runs" / "rt"


def prompt(tokenizer) -> list[int]:
    messages = [{"role": "user", "content": "Review: the film was great 👍. Answer:"}]
    return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))["input_ids"]


def test_eval_reproduces_the_run(run: Path) -> None:
    metrics = json.loads((run / "run.json").read_text())["metrics"]
    assert f"perplexity: {metrics['perplexity']:.4f}" in invoke("eval", run, "--no-progress")


def test_merged_folder_loads_with_auto_model_for_causal_lm(run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    invoke("merge", run, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    adapted, _, _ = load_trained(run)
    ids = torch.tensor([prompt(tokenizer)])
    with torch.no_grad():
        expected = adapted.eval()(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5 * expected.abs().max())


def test_peft_export_loads_with_plain_peft(run: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    invoke("export", run, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    base_path = json.loads((run / "run.json").read_text())["model"]
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == base_path
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), tmp_path / "peft").eval()
    adapted, _, _ = load_trained(run)
    ids = torch.tensor([prompt(AutoTokenizer.from_pretrained(base_path))])
    with torch.no_grad():
        expected = adapted.eval()(input_ids=ids).logits
        torch.testing.assert_close(
            peft_model(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5 * expected.abs().max()
        )


def test_the_run_is_served_by_the_engine(run: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from peftkit.serve.cache import AdapterCache
    from peftkit.serve.engine import Engine, Request
    from peftkit.serve.sampling import SamplingParams

    base_path = json.loads((run / "run.json").read_text())["model"]
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    cache = AdapterCache(2**26, root=run.parent)
    cache.register("rt", run / "adapter")
    engine = Engine(AutoModelForCausalLM.from_pretrained(base_path), tokenizer, cache)
    try:
        ids = prompt(tokenizer)
        (served,) = engine.generate([Request(ids, adapter="rt", params=SamplingParams(max_tokens=5, ignore_eos=True))])
    finally:
        engine.stop()
    adapted, _, _ = load_trained(run)
    greedy = GenerationConfig(max_new_tokens=5, do_sample=False, min_new_tokens=5, pad_token_id=tokenizer.eos_token_id)
    expected = adapted.eval().generate(input_ids=torch.tensor([ids]), generation_config=greedy)[0, len(ids) :].tolist()
    assert served.error is None and served.output_ids == expected
