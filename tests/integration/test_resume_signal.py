"""SIGINT / SIGTERM for real: ``peftkit train`` in a subprocess (a tiny Llama on chat data, slowed to ~0.1 s per
micro-batch so the signal lands mid-run) is signalled after step 5; it finishes the step, writes a checkpoint,
names it and exits 130 / 143; ``peftkit train --resume RUN`` then ends with the adapter and the logged losses
of the run that was never interrupted.

Before: Ctrl-C left nothing (checkpoints were written per epoch and held only the adapter; no resume)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny_lm import chat_rows, save, write_jsonl
from safetensors.torch import load_file
from typer.testing import CliRunner

from peftkit.cli import app

pytest.importorskip("transformers")
runner = CliRunner(env={"COLUMNS": "200"})

# The real CLI, each micro-batch slowed down (test only) so that the run is still going when the signal comes.
SCRIPT = """
import sys, time, torch
torch.set_num_threads({threads})
from peftkit.train import trainer
batch = trainer.Trainer._batch
def slow(self, *args):
    time.sleep(0.1)
    return batch(self, *args)
trainer.Trainer._batch = slow
from peftkit.cli import main
sys.argv = ["peftkit", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("signal")
    model = save(root / "tiny")
    data = write_jsonl(root / "chat.jsonl", chat_rows(24))
    args = ["train", "--model", str(model), "--data", str(data), "--task", "causal-lm", "--r", "4", "--alpha", "8",
            "--lr", "1e-2", "--batch-size", "4", "--epochs", "4", "--max-steps", "20", "--log-every", "1",
            "--no-progress", "--set", "task.exact_match=false", "--set", "method.dropout=0.1"]  # fmt: skip
    return root, args


@pytest.fixture(scope="module")
def uninterrupted(setup: tuple[Path, list[str]]) -> Path:
    root, args = setup
    result = runner.invoke(app, [*args, "--output-dir", str(root / "full")])
    assert result.exit_code == 0, result.output
    return root / "full"


def losses(run: Path) -> list[tuple[int, float]]:
    return [(x["step"], x["loss"]) for x in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_checkpoints_and_resume_continues_exactly(setup, uninterrupted: Path, sig: int, code: int) -> None:
    root, args = setup
    run = root / f"run-{sig}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    script = SCRIPT.format(threads=torch.get_num_threads())
    proc = subprocess.Popen(
        [sys.executable, "-u", "-c", script, *args, "--output-dir", str(run)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 5/20"):
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == code, "".join(seen) + out + err
    stopped = int(json.loads((run / "run.json").read_text()).get("step", 0) or 0) or max(s for s, _ in losses(run))
    assert 5 <= stopped < 20
    checkpoint = run / "checkpoints" / f"step-{stopped}"
    name = signal.Signals(sig).name
    assert err.strip().splitlines()[-1] == (
        f"interrupted ({name}): checkpoint {checkpoint}; continue with: peftkit train --resume {run}"
    )
    assert (checkpoint / "trainer.json").is_file() and "Traceback" not in err

    result = runner.invoke(app, ["train", "--resume", str(run), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"resuming {run} from step-{stopped}" in result.output
    resumed = load_file(str(run / "adapter" / "adapter.safetensors"))
    expected = load_file(str(uninterrupted / "adapter" / "adapter.safetensors"))
    assert resumed.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6 * float(value.abs().max()), msg=key)
    assert [s for s, _ in losses(run)] == [s for s, _ in losses(uninterrupted)] == list(range(1, 21))
    assert [x for _, x in losses(run)] == pytest.approx([x for _, x in losses(uninterrupted)], rel=1e-6)
