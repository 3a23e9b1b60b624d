"""Multi-process training with 2 CPU processes (gloo): DDP and FSDP2 follow the single-process run at the same
global batch, a run resumed from a DCP checkpoint follows the uninterrupted one (both), and rank 0 alone writes
the metrics.

Every process trains a tiny causal LM (built in code) with LoRA, dropout off (each rank draws its own dropout masks,
which cannot equal one process's draws over the whole batch). The examples have different lengths and prompts
masked out of the loss, so the ranks hold different numbers of labelled tokens (the token weighting of
``Distributed.reduce_loss`` matters), and the last global batch has one example (the second rank's share is
empty). Gradients are clipped (max_grad_norm 0.5), so the global gradient norm matters too.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

N_EXAMPLES, PER_RANK, WORLD = 25, 4, 2
WATCHDOG_S = 60
STEPS_BEFORE = 4  # the resumed run starts from checkpoint step-4 of 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def examples(n: int = N_EXAMPLES) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        length = 5 + i % 7
        ids = torch.randint(3, 64, (length,), generator=g)
        labels = ids.clone()
        labels[: 1 + i % 3] = -100  # a prompt of 1-3 tokens, not trained on
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), 2, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention (right padding never reaches a real token) and MLP."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.up_proj, self.down_proj = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down_proj(nn.functional.gelu(self.up_proj(self.norm2(x))))


class TinyLM(nn.Module):
    """A 2-block causal LM whose loss is Hugging Face's: the mean cross-entropy over the shifted labels other than
    -100 (no transformers import: each spawned process starts faster)."""

    def __init__(self, vocab: int = 64, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(2))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None, labels: Any = None) -> dict[str, Any]:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(self.norm(x))
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return {"loss": loss, "logits": logits}


def adapted_model() -> Any:
    import peftkit as pk

    torch.manual_seed(0)
    base = TinyLM()
    return pk.adapt(base, pk.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], dropout=0.0))


def config(batch_size: int, output_dir: Path | None = None, **extra: Any) -> Any:
    from peftkit.train import TrainConfig

    return TrainConfig(epochs=2, batch_size=batch_size, lr=2e-2, max_grad_norm=0.5, seed=0, progress=False,
                       output_dir=output_dir, save_every=2 if output_dir else None, keep_checkpoints=None,
                       **extra)  # fmt: skip


def trained_state(model: Any) -> dict[str, list[float]]:
    return {n: p.detach().reshape(-1).tolist() for n, p in model.named_parameters() if p.requires_grad}


def fit(group: Any, output_dir: Path | None = None, resume_from: Path | None = None, **extra: Any) -> dict[str, Any]:
    from peftkit.train import Trainer
    from peftkit.train.build import labelled_tokens
    from peftkit.train.distributed import full_parameters

    model = adapted_model()
    trainer = Trainer(model, config(PER_RANK, output_dir, **extra), examples(), collate_fn=collate, distributed=group,
                      loss_weight=labelled_tokens, log=lambda m: None)  # fmt: skip
    result = trainer.fit(resume_from=resume_from)
    with full_parameters(model) if group.fsdp else torch.no_grad():
        state = trained_state(model)
    return {"loss": [h["loss"] for h in result.history], "grad_norm": [h["grad_norm"] for h in result.history],
            "state": state, "checkpoints": [str(c) for c in result.checkpoints]}  # fmt: skip


def worker(rank: int, port: int, out: str) -> None:
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)  # a hung collective fails the test, never hangs it
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    from peftkit.train.distributed import session

    root = Path(out)
    results: dict[str, Any] = {}
    with session(fsdp=False) as group:  # one group for all three runs (joining twice on one port can hang)
        results["ddp"] = fit(group, root / "ddp-ckpt", metrics_file=root / "ddp-metrics.jsonl", log_every=1)
        ddp_resume = root / "ddp-ckpt" / f"step-{STEPS_BEFORE}"
        results["ddp_resumed"] = fit(group, root / "ddp-ckpt", ddp_resume, metrics_file=root / "ddp-metrics.jsonl",
                                     log_every=1)  # fmt: skip
        sharded = dataclasses.replace(group, fsdp=True)
        results["fsdp"] = fit(sharded, root / "fsdp-ckpt")
        results["fsdp_resumed"] = fit(sharded, root / "fsdp-ckpt", root / "fsdp-ckpt" / f"step-{STEPS_BEFORE}")
    (root / f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("dist")
    mp.start_processes(worker, args=(free_port(), str(out)), nprocs=WORLD, start_method="spawn")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    torch.set_num_threads(1)
    from peftkit.train.distributed import LOCAL

    return {"ranks": ranks, "single": _single_run(), "out": out, "local": fit(LOCAL)}


def _single_run() -> dict[str, Any]:
    """One process at the global batch (2 x 4)."""
    from peftkit.train import Trainer

    model = adapted_model()
    trainer = Trainer(model, config(PER_RANK * WORLD), examples(), collate_fn=collate, log=lambda m: None)
    result = trainer.fit()
    return {"loss": [h["loss"] for h in result.history], "grad_norm": [h["grad_norm"] for h in result.history],
            "state": trained_state(model)}  # fmt: skip


def assert_same_run(got: dict[str, Any], want: dict[str, Any]) -> None:
    loss, ref = torch.tensor(got["loss"], dtype=torch.float64), torch.tensor(want["loss"], dtype=torch.float64)
    assert len(loss) == len(ref) == 8  # ceil(25 / 8) = 4 steps per epoch, 2 epochs
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0.0)
    norms = torch.tensor(got["grad_norm"], dtype=torch.float64)
    torch.testing.assert_close(norms, torch.tensor(want["grad_norm"], dtype=torch.float64), rtol=1e-5, atol=0.0)
    assert sorted(got["state"]) == sorted(want["state"])
    # The weights after 8 Adam steps: Adam divides each gradient entry by its own running RMS, so an entry whose
    # gradient is near 0 turns the float32 rounding of the summation order (one batch vs two shares) into a
    # visible difference (measured: 1 of 128 entries off by 3e-5 of the tensor's largest); 1e-4 of it allowed.
    for name, values in want["state"].items():
        a, b = torch.tensor(got["state"][name]), torch.tensor(values)
        torch.testing.assert_close(
            a, b, rtol=1e-5, atol=1e-4 * float(b.abs().max()), msg=lambda m, name=name: f"{name}: {m}"
        )


def test_ddp_loss_curve_equals_one_process_at_the_global_batch(runs: dict[str, Any]) -> None:
    for rank in runs["ranks"]:
        assert_same_run(rank["ddp"], runs["single"])


def test_fsdp2_loss_curve_equals_one_process_at_the_global_batch(runs: dict[str, Any]) -> None:
    for rank in runs["ranks"]:
        assert_same_run(rank["fsdp"], runs["single"])


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_resumed_from_dcp_checkpoint_equals_the_uninterrupted_run(runs: dict[str, Any], kind: str) -> None:
    for rank in runs["ranks"]:
        whole, resumed = rank[kind], rank[f"{kind}_resumed"]
        assert resumed["loss"] == whole["loss"][STEPS_BEFORE:]  # bit-identical: same shards, same order
        assert resumed["state"] == whole["state"]


def test_rank_0_alone_writes_the_metrics(runs: dict[str, Any]) -> None:
    lines = [json.loads(x) for x in (runs["out"] / "ddp-metrics.jsonl").read_text().splitlines()]
    # each step once (two writers would log every step twice); the resumed run rewrote steps 5-8
    assert [x["step"] for x in lines] == list(range(1, 9))
    assert [x["loss"] for x in lines] == runs["ranks"][0]["ddp"]["loss"]


def test_dcp_checkpoint_holds_only_the_trainable_parameters(runs: dict[str, Any]) -> None:
    from torch.distributed.checkpoint import FileSystemReader

    folder = runs["out"] / "fsdp-ckpt" / "step-2"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter", "dcp", "trainer.json", "trainer.safetensors"]
    names = set(FileSystemReader(str(folder / "dcp")).read_metadata().state_dict_metadata)
    params = {n.split(".", 1)[1] for n in names if n.startswith("model.")}
    trainable = set(runs["single"]["state"])
    assert params == trainable  # the LoRA A / B of 3 targets x 2 layers, no frozen base weight
    assert all(n.endswith(("adapters.default.A", "adapters.default.B")) for n in params) and len(params) == 12
    state = json.loads((folder / "trainer.json").read_text())
    assert state["world_size"] == 2 and state["optimizer"] == {"sharded": True} and len(state["rng"]["ranks"]) == 2


def test_a_global_batch_is_what_one_process_sees(runs: dict[str, Any]) -> None:
    # Without the token weighting the ranks' mean losses would be averaged with equal weight: the runs would
    # differ from the first step (shown here on the batch sizes of this data).
    from peftkit.train.build import labelled_tokens

    order = torch.randperm(N_EXAMPLES, generator=_dataloader_generator()).tolist()
    first = [examples()[i] for i in order[: PER_RANK * WORLD]]
    counts = [labelled_tokens(collate(first[:PER_RANK])), labelled_tokens(collate(first[PER_RANK:]))]
    assert counts[0] != counts[1]
    assert runs["local"]["loss"] != runs["single"]["loss"]  # batch 4 on one process is another run


def _dataloader_generator() -> torch.Generator:
    g = torch.Generator().manual_seed(0)
    torch.empty((), dtype=torch.int64).random_(generator=g)
    return g
