"""peftkit.train.checkpoint and Trainer.fit(resume_from=...): a run stopped at step k and resumed from its
checkpoint ends with the same adapter, optimizer state and losses as the run that never stopped; checkpoints
are atomic, pruned, free of pickle, and refuse a model, data or settings they were not written for."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from _tiny_lm import token_dataset, token_loss
from conftest import make_tiny_net

import peftkit as pk
from peftkit.train import Callback, CheckpointError, TrainConfig, Trainer
from peftkit.train import checkpoint as ckpt


def dataset(n: int = 60, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return token_dataset(n, seed)


loss_fn = token_loss


def adapted(init_seed: int | None = 0) -> pk.AdaptedModel:
    # dropout draws from torch's RNG every step: resuming exactly needs the RNG state restored too
    cfg = pk.LoRAConfig(r=4, alpha=8, dropout=0.2, targets=["fc1", "fc2"], modules_to_save=["head"], seed=init_seed)
    return pk.adapt(make_tiny_net(), cfg)


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, logs) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


# 60 examples, batches of 8 with 2 micro-batches per step: 8 micro-batches (the last of 4), 4 steps per epoch
SETTINGS = {"batch_size": 8, "grad_accum": 2, "lr": 2e-2, "weight_decay": 0.01, "warmup_steps": 3,
            "max_steps": 20, "epochs": 6, "progress": False}  # fmt: skip


def trainer(model: torch.nn.Module, out: Path | None, **kw: Any) -> Trainer:
    callbacks = kw.pop("callbacks", ())
    cfg = TrainConfig(**{**SETTINGS, **kw}, output_dir=out)
    return Trainer(model, cfg, dataset(), loss_fn=loss_fn, callbacks=callbacks)


def state(model: pk.AdaptedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.adapter_state_dict("default").items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("full")
    model = adapted()
    t = trainer(model, out, save_every=5, keep_checkpoints=None)
    result = t.fit()
    return model, [h["loss"] for h in result.history], t.optimizer.state_dict(), out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6 * float(b[key].abs().max()) + 1e-12, msg=key)


@pytest.mark.parametrize("stop", [10, 8, 3])  # mid-epoch and mid-permutation, an epoch's end, during warmup
def test_stop_and_resume_equals_the_uninterrupted_run(uninterrupted, tmp_path: Path, stop: int) -> None:
    full_model, full_losses, full_optimizer, _ = uninterrupted
    first = trainer(adapted(), tmp_path, callbacks=[StopAt(stop)])
    part1 = first.fit()
    assert first.global_step == stop and (tmp_path / f"step-{stop}").is_dir()
    # a fresh process rebuilds the model (the adapter drawn anew, another global RNG state): do the same
    torch.manual_seed(123)
    model = adapted(init_seed=None)
    second = trainer(model, tmp_path)
    part2 = second.fit(resume_from=tmp_path / f"step-{stop}")
    assert second.global_step == 20
    assert_same(state(model), state(full_model))
    losses = [h["loss"] for h in part1.history] + [h["loss"] for h in part2.history]
    assert losses == pytest.approx(full_losses, rel=1e-6, abs=0)
    resumed = second.optimizer.state_dict()["state"]
    for i, entry in full_optimizer["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(resumed[i][key], entry[key], rtol=1e-6, atol=1e-12)


def test_resume_from_a_save_every_checkpoint(uninterrupted, tmp_path: Path) -> None:
    full_model, _, _, out = uninterrupted
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [4, 5, 8, 10, 12, 15, 16, 20]  # save_every 5 + epoch ends
    model = adapted(init_seed=None)
    trainer(model, tmp_path).fit(resume_from=out / "step-15")
    assert_same(state(model), state(full_model))


def test_without_the_rng_state_the_resume_would_differ(uninterrupted, tmp_path: Path, monkeypatch) -> None:
    # The check above is sharp: skipping the RNG restore (dropout masks) changes the final adapter.
    full_model, _, _, out = uninterrupted
    monkeypatch.setattr(ckpt, "set_rng_state", lambda values, tensors: None)
    model = adapted()
    trainer(model, tmp_path).fit(resume_from=out / "step-10")
    diff = max(float((a - b).abs().max()) for a, b in zip(state(model).values(), state(full_model).values()))
    assert diff > 1e-4


def test_checkpoint_files_hold_no_pickle(uninterrupted) -> None:
    _, _, _, out = uninterrupted
    files = {f.name for f in (out / "step-10").rglob("*") if f.is_file()}
    assert files == {"adapter.json", "adapter.safetensors", "trainer.json", "trainer.safetensors"}
    saved = json.loads((out / "step-10" / "trainer.json").read_text())
    assert saved["step"] == 10 and saved["epoch"] == 3 and saved["micro_batches_done"] == 4
    assert saved["total_steps"] == 20 and len(saved["rng"]["python"][1]) == 625


def test_keep_checkpoints_prunes_the_oldest(tmp_path: Path) -> None:
    result = trainer(adapted(), tmp_path, save_every=3, keep_checkpoints=2).fit()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [18, 20]
    assert result.checkpoints[-1] == tmp_path / "step-20"


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = trainer(adapted(), tmp_path, max_steps=4, epochs=1)
    t.fit()
    before = (tmp_path / "step-4" / "trainer.safetensors").read_bytes()

    def broken(folder, state, tensors):
        (folder / "trainer.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "write_state", broken)
    with pytest.raises(OSError, match="No space left"):
        t.save_checkpoint()
    assert (tmp_path / "step-4" / "trainer.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4"]  # no temporary folder left


@pytest.mark.parametrize("kind", ["tmp", "old"])
def test_dead_writers_temporary_folders_are_removed(tmp_path: Path, kind: str) -> None:
    dead = tmp_path / f".step-7.{kind}-999999999-abcd"
    dead.mkdir()
    (dead / "trainer.json").write_text("{}")
    ckpt.write_checkpoint(tmp_path, 8, lambda folder: (folder / "trainer.json").write_text("{}"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-8"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [8]


def test_dead_staging_folders_of_the_multi_process_writer_are_removed(tmp_path: Path) -> None:
    # a killed multi-process checkpoint write left its staging folder (DCP shards) behind: it was never cleaned
    dead, live = tmp_path / ".step-7.staging-999999999-abcd", tmp_path / f".step-8.staging-{os.getppid()}-abcd"
    for folder in (dead, live):
        (folder / "dcp").mkdir(parents=True)
    ckpt.remove_dead_temporaries(tmp_path, kinds=("staging",))
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]  # a running writer's folder stays


def test_resume_refuses_other_data_settings_or_model(uninterrupted, tmp_path: Path) -> None:
    _, _, _, out = uninterrupted
    other = Trainer(adapted(), TrainConfig(**SETTINGS), dataset(59), loss_fn=loss_fn)
    with pytest.raises(CheckpointError, match="written for 60 training examples, this run has 59"):
        other.fit(resume_from=out / "step-10")
    with pytest.raises(CheckpointError, match=r"other training settings \(lr: 0.02 -> 0.03\)"):
        trainer(adapted(), None, lr=3e-2).fit(resume_from=out / "step-10")
    wider = pk.adapt(make_tiny_net(), pk.LoRAConfig(r=8, alpha=8, targets=["fc1", "fc2"], modules_to_save=["head"]))
    with pytest.raises(CheckpointError, match="does not fit the model"):
        trainer(wider, None).fit(resume_from=out / "step-10")
    with pytest.raises(CheckpointError, match="is not a checkpoint folder"):
        trainer(adapted(), None).fit(resume_from=tmp_path)


def test_plain_modules_checkpoint_their_trainable_parameters(tmp_path: Path) -> None:
    def plain() -> torch.nn.Module:
        net = make_tiny_net()
        for p in net.emb.parameters():
            p.requires_grad_(False)
        return net

    full = plain()
    trainer(full, None).fit()
    first = plain()
    trainer(first, tmp_path, callbacks=[StopAt(6)]).fit()
    assert (tmp_path / "step-6" / ckpt.PARAMS_FILE).is_file()
    resumed = plain()
    trainer(resumed, tmp_path).fit(resume_from=tmp_path / "step-6")
    for (name, a), b in zip(resumed.named_parameters(), full.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
