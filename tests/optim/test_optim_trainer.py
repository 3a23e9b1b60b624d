"""Optimizers chosen from the Trainer (``TrainConfig.optim`` / ``optim_options``): a short run with each name
uses that optimizer and trains; the schedule keeps LoRA+'s ratio; checkpoints of optimizers whose state is not
shaped like the parameters (GaLore, LoRA-Pro, AdamW8bit) resume exactly; bad names and options are refused when
the settings are made."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from _tiny_lm import token_dataset, token_loss
from conftest import make_tiny_net
from torch import nn

import peftkit as pk
from peftkit.optim import NoTrainableParametersError, OptimizerError
from peftkit.train import TrainConfig, Trainer
from peftkit.train.trainer import Callback

# name -> (method config, optimizer options, the optimizer class)
CASES = {
    "adamw": (pk.LoRAConfig(r=2, targets=["fc1", "fc2"]), {}, "AdamW"),
    "adamw8bit": (pk.LoRAConfig(r=2, targets=["fc1", "fc2"]), {"min_8bit_size": 16}, "AdamW8bit"),
    "galore": (pk.FullConfig(targets=["fc1", "fc2"]), {"rank": 2, "update_proj_gap": 2}, "GaLoreAdamW"),
    "lorapro": (pk.LoRAConfig(r=2, targets=["fc1", "fc2"]), {}, "LoRAPro"),
    "loraplus": (pk.LoRAConfig(r=2, targets=["fc1", "fc2"]), {"ratio": 4.0}, "AdamW"),
    "allora": (pk.LoRAConfig(r=2, targets=["fc1", "fc2"]), {"eta": 2.0}, "ALLoRAAdamW"),
    "sst": (pk.get_config("sst", r=2, round_steps=2, targets=["fc1", "fc2"]), {}, "SSTAdamW"),
}


def config(name: str, options: dict, **kw: object) -> TrainConfig:
    settings = {"lr": 1e-2, "batch_size": 8, "progress": False, "divergence_factor": None, "schedule": "constant"}
    return TrainConfig(optim=name, optim_options=dict(options), **{**settings, **kw})


def trainer(name: str, method: pk.AdapterConfig | None = None, **kw: object) -> Trainer:
    default, options, _ = CASES[name]
    method = method or default
    model = pk.adapt(make_tiny_net(), copy.deepcopy(method))
    return Trainer(model, config(name, options, **kw), token_dataset(32), loss_fn=token_loss, log=lambda m: None)


def adapter_tensors(t: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in t.model.parameters() if p.requires_grad]


@pytest.mark.parametrize("name", list(CASES))
def test_each_optimizer_trains_from_the_trainer(name: str) -> None:
    if name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    t = trainer(name, max_steps=4)
    assert type(t.optimizer).__name__ == CASES[name][2]
    before = adapter_tensors(t)
    result = t.fit()
    assert result.global_step == 4
    moved = max(float((a - b).abs().max()) for a, b in zip(adapter_tensors(t), before))
    assert moved > 1e-3


def test_schedule_keeps_the_loraplus_ratio() -> None:
    """The cosine schedule scales each group's own start: B's group stays at ratio × A's at every step (before:
    every group was set to the same lr, which turned LoRA+ into AdamW after the first step)."""
    t = trainer("loraplus", max_steps=3, schedule="cosine", min_lr_ratio=0.1)
    seen: list[list[float]] = []
    original = t.optimizer.step

    def step(*args: object, **kw: object) -> object:
        seen.append([g["lr"] for g in t.optimizer.param_groups])
        return original(*args, **kw)

    t.optimizer.step = step  # type: ignore[method-assign]
    t.fit()
    assert len(seen) == 3
    for a_lr, b_lr, *_ in seen:
        assert b_lr == pytest.approx(4.0 * a_lr, rel=1e-12)
    assert seen[0][0] == pytest.approx(1e-2) and seen[-1][0] == pytest.approx(1e-3)


@pytest.mark.parametrize("name", ["galore", "lorapro", "sst", "adamw8bit"])
def test_resume_equals_uninterrupted(name: str, tmp_path: Path) -> None:
    """4 steps straight vs 2 steps, a checkpoint, and 2 more from it in a new trainer: the same weights. (Before:
    loading refused GaLore's projected and LoRA-Pro's full-size moments as 'not the parameter's shape'.)"""
    if name == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    # SST: rounds of 3 steps, so the new round (and the optimizer's reset) falls after the resume
    method = pk.get_config("sst", r=2, round_steps=3, targets=["fc1", "fc2"]) if name == "sst" else None
    straight = trainer(name, method, max_steps=4)
    straight.fit()
    first = trainer(name, method, max_steps=4, output_dir=tmp_path, save_every=2)

    class StopAt2(Callback):
        def on_step_end(self, trainer: Trainer, logs: dict) -> None:
            trainer.should_stop = trainer.global_step >= 2

    first.callbacks.append(StopAt2())
    first.fit()
    resumed = trainer(name, method, max_steps=4, output_dir=tmp_path, save_every=2)
    resumed.fit(resume_from=tmp_path / "step-2")
    assert resumed.global_step == 4
    for a, b in zip(adapter_tensors(resumed), adapter_tensors(straight)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_optimizer_settings_are_refused_early() -> None:
    with pytest.raises(OptimizerError, match=r"unknown optimizer 'adam'; choose one of adamw, adamw8bit, galore"):
        TrainConfig(optim="adam")
    with pytest.raises(OptimizerError, match=r"'galore' has no option\(s\) \['ratio'\]"):
        TrainConfig(optim="galore", optim_options={"ratio": 2})
    frozen = make_tiny_net().requires_grad_(False)
    with pytest.raises(NoTrainableParametersError, match="add and activate an adapter"):
        Trainer(frozen, TrainConfig(progress=False), token_dataset(8), loss_fn=token_loss)
    model = pk.adapt(nn.Sequential(nn.Linear(4, 4)), pk.get_config("pfeiffer", r=2, targets=["0"]))
    with pytest.raises(OptimizerError, match="choose another optimizer"):
        Trainer(model, TrainConfig(optim="lorapro", progress=False), token_dataset(8), loss_fn=token_loss)


def test_resume_at_an_sst_round_boundary(tmp_path: Path) -> None:
    method = pk.get_config("sst", r=2, round_steps=2, targets=["fc1", "fc2"])
    straight = trainer("sst", method, max_steps=4)
    straight.fit()
    first = trainer("sst", method, max_steps=4, output_dir=tmp_path, save_every=2)

    class StopAt2(Callback):
        def on_step_end(self, trainer: Trainer, logs: dict) -> None:
            trainer.should_stop = trainer.global_step >= 2

    first.callbacks.append(StopAt2())
    first.fit()
    resumed = trainer("sst", method, max_steps=4, output_dir=tmp_path, save_every=2)
    resumed.fit(resume_from=tmp_path / "step-2")
    for a, b in zip(adapter_tensors(resumed), adapter_tensors(straight)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
