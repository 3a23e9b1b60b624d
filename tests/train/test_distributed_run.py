"""``peftkit train --nproc N [--fsdp]``: the settings refused with the fix named, the NF4 sharding rule of FSDP2,
and (slow) whole runs through torchrun on a tiny Llama folder: 2 processes write one run folder (rank 0 alone)
whose losses equal one process's at the same global batch, and FSDP2 over an NF4 (bitsandbytes) base trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cli import runner
from _tiny_lm import prompt_rows, save, write_jsonl
from torch import nn

from peftkit.cli import app
from peftkit.train.distributed import DistributedError, check_launch, check_nf4_sharding, max_processes

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, " ".join(result.output.split())


def test_more_processes_than_cores_is_refused_naming_the_limit(tmp_path: Path) -> None:
    too_many = max_processes() + 1
    code, out = run_cli("train", "--output-dir", tmp_path / "run", "--nproc", too_many)
    assert code == 2 and f"--nproc {too_many} is more processes than this machine has" in out
    assert f"use --nproc {max_processes()} or fewer" in out and not (tmp_path / "run").exists()
    with pytest.raises(DistributedError, match=r"CPU core\(s\) \(os.cpu_count\(\)\)"):
        check_launch(os.cpu_count() + 1, False, "cpu")


def test_fsdp_on_one_process_is_refused_naming_nproc(tmp_path: Path) -> None:
    code, out = run_cli("train", "--output-dir", tmp_path / "run", "--fsdp")
    assert code == 2 and "--fsdp shards the model over several processes: add --nproc 2 (or more)" in out
    code, out = run_cli("train", "--output-dir", tmp_path / "run", "--fsdp", "--nproc", 1)
    assert code == 2 and "add --nproc 2" in out and not (tmp_path / "run").exists()


def test_nproc_in_python_outside_torchrun_names_the_command(tmp_path: Path) -> None:
    from peftkit.train.run import train

    with pytest.raises(DistributedError, match="not started by torchrun; run 'peftkit train --nproc 2"):
        train(tmp_path / "run", nproc=2, progress=False, log=lambda m: None)


def test_fsdp2_with_an_optimizer_on_whole_matrices_is_refused() -> None:
    from peftkit.train.distributed import Distributed

    group = Distributed(rank=0, world_size=2, fsdp=True)  # refused before any collective: no group needed
    with pytest.raises(DistributedError, match=r"optimizer 'galore' works on whole matrices.*use adamw or loraplus"):
        group.wrap(nn.Linear(4, 4), "galore")


def nf4_linear(out_features: int, in_features: int) -> nn.Linear:
    pytest.importorskip("torchao")
    from torchao.quantization import to_nf4

    layer = nn.Linear(in_features, out_features, bias=False)
    layer.weight = nn.Parameter(to_nf4(layer.weight.detach()), requires_grad=False)
    return layer


def test_nf4_weights_whose_blocks_do_not_divide_the_world_size_are_named() -> None:
    # 128 x 128 = 16384 values = one group of 64 x 256: it cannot be split over 2 processes.
    model = nn.Sequential(nf4_linear(256, 128), nf4_linear(128, 128))
    check_nf4_sharding(model, 1)
    with pytest.raises(DistributedError, match=r"NF4 weight 1.weight \(16384 values, 1 groups of 16384\) over 2 "):
        check_nf4_sharding(model, 2)
    with pytest.raises(DistributedError, match="world sizes that work for every NF4 weight of this model: 1 "):
        check_nf4_sharding(model, 2)
    wide = nn.Sequential(nf4_linear(512, 128), nf4_linear(256, 128))  # 4 and 2 groups
    check_nf4_sharding(wide, 2)
    with pytest.raises(DistributedError, match=r"1\.weight .* over 4 processes.*work for every NF4 weight of "
                       r"this model: 1, 2 "):  # fmt: skip
        check_nf4_sharding(wide, 4)


# ------------------------------------------------------------------------------------ whole runs (slow)
@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    return save(tmp_path_factory.mktemp("tiny-llama"))


def peftkit_cli(*args: object, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "peftkit.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)  # fmt: skip


def common(lm_dir: Path, data: Path) -> list[object]:
    return ["--model", lm_dir, "--data", data, "--task", "causal-lm", "--r", 4, "--lr", 0.02, "--max-steps", 6,
            "--log-every", 1, "--save-every", 3, "--no-progress", "--set", "task.max_new_tokens=1",
            "--set", "train.max_grad_norm=0.5"]  # fmt: skip


@pytest.mark.slow
def test_two_ddp_processes_write_one_run_equal_to_one_process_at_the_global_batch(lm_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pc.jsonl", prompt_rows(40))  # prompts of different lengths: token weighting
    one = peftkit_cli("train", "--output-dir", tmp_path / "one", "--batch-size", 4, *common(lm_dir, data))
    assert one.returncode == 0, one.stderr
    two = peftkit_cli("train", "--output-dir", tmp_path / "two", "--batch-size", 2, "--nproc", 2,
                      *common(lm_dir, data))  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "starting 2 processes: torchrun --nproc-per-node 2 --standalone -m peftkit.cli train" in two.stdout
    assert two.stdout.count("steps, ") == 1  # rank 0 alone reports
    run = tmp_path / "two"
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "checkpoints", "metrics.jsonl", "run.json"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3", "step-6"]
    assert sorted(p.name for p in (run / "checkpoints" / "step-3").iterdir()) == [
        "adapter", "dcp", "run.json", "trainer.json", "trainer.safetensors"]  # fmt: skip
    record = json.loads((run / "run.json").read_text())
    assert record["nproc"] == 2 and record["fsdp"] is False and record["status"] == "complete"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 7))  # each step logged once: one writer
    ref = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    loss, want = torch.tensor([x["loss"] for x in lines]), torch.tensor([x["loss"] for x in ref])
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=0.0)
    # the adapter rank 0 saved evaluates (in one process) to the metrics the run logged
    code, out = run_cli("eval", run, "--no-progress")
    assert code == 0 and f"eval_loss: {record['metrics']['eval_loss']:.4f}" in out


@pytest.mark.slow
def test_fsdp2_over_an_nf4_base_trains_and_resumes(lm_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    data = write_jsonl(tmp_path / "pc.jsonl", prompt_rows(40))
    args = [*common(lm_dir, data), "--batch-size", 4, "--epochs", 2, "--quantize", "nf4"]  # 5 steps an epoch
    whole = peftkit_cli("train", "--output-dir", tmp_path / "whole", "--nproc", 2, "--fsdp", *args)
    assert whole.returncode == 0, whole.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2])  # it learns
    record = json.loads((tmp_path / "whole" / "run.json").read_text())
    assert record["fsdp"] is True and record["quantize"] == "nf4" and record["nproc"] == 2
    # resume from step-3 (the CLI restarts 2 FSDP2 processes from run.json): the same steps 4-6
    resumed = peftkit_cli("train", "--resume", tmp_path / "whole" / "checkpoints" / "step-3", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = [json.loads(x)["loss"] for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor(again), torch.tensor(losses), rtol=1e-6, atol=0.0)
