"""An AdaptedModel under Hugging Face ``transformers.Trainer``: trains (tiny BERT); on tied-weight causal LMs
(tiny GPT-2 and Llama) ``HFAdapterTrainer`` checkpoints the adapters only and resumes exactly; gradient
checkpointing and bf16 autocast on CPU."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_bert, tiny_gpt2

import peftkit as pk

transformers = pytest.importorskip("transformers")


def examples(n: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (n, 8), generator=g)
    labels = (ids[:, 0] >= 34).long()  # the first token (what the pooler reads) decides the label
    return [
        # "idx" is not a forward argument: the Trainer must drop it (remove_unused_columns, default True).
        {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": label, "idx": torch.tensor(i)}
        for i, (row, label) in enumerate(zip(ids, labels))
    ]


@torch.no_grad()
def mean_loss(model: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    batch = {k: torch.stack([d[k] for d in data]) for k in ("input_ids", "attention_mask", "labels")}
    return model(**batch).loss.item()


def test_adapted_model_trains_under_hf_trainer(tmp_path) -> None:
    cfg = pk.LoRAConfig(r=4, alpha=8, targets=["query", "value"], modules_to_save=["classifier"], seed=0)
    model = pk.adapt(tiny_bert(num_labels=2), cfg)
    assert {"input_ids", "attention_mask", "labels"} <= set(inspect.signature(model.forward).parameters)
    data = examples()
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    before = mean_loss(model, data)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=24,
        per_device_train_batch_size=8,
        learning_rate=5e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    assert args.remove_unused_columns  # left at its default
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()

    after = mean_loss(model, data)
    assert after < before - 0.05, (before, after)
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"base weight {n} changed"
        else:
            assert not torch.equal(p, adapter[n]), f"adapter weight {n} did not train"
    assert set(adapter) == {n for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------ tied-weight causal LMs: checkpoints, resume


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama causal LM with tied input/output embeddings (SmolLM2's layout), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


CAUSAL = {
    "gpt2": (tiny_gpt2, ["c_attn"]),
    "llama": (tiny_llama, ["q_proj", "v_proj"]),
}


def lm_examples(n: int = 48, length: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (n, length), generator=g)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in ids]


def causal_model(kind: str, **lora: Any) -> pk.AdaptedModel:
    build, targets = CAUSAL[kind]
    base = build()
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight  # tied
    return pk.adapt(base, pk.LoRAConfig(r=4, alpha=8, targets=targets, seed=0, **lora))


def lm_args(out: Path, **kw: Any) -> Any:
    base: dict[str, Any] = {
        "output_dir": str(out),
        "max_steps": 6,
        "per_device_train_batch_size": 8,
        "learning_rate": 2e-2,
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "save_strategy": "steps",
        "save_steps": 3,
    }
    return transformers.TrainingArguments(**{**base, **kw})


def adapter_values(model: pk.AdaptedModel) -> dict[str, torch.Tensor]:
    return {k: t.detach().clone() for k, t in model.adapter_state_dict("default").items()}


def losses(trainer: Any) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("kind", sorted(CAUSAL))
def test_plain_hf_trainer_cannot_checkpoint_tied_weight_lms(kind: str, tmp_path: Path) -> None:
    """What HFAdapterTrainer fixes: transformers.Trainer saves a non-PreTrainedModel's whole state_dict with
    safetensors, which refuses the tied embeddings."""
    model = causal_model(kind)
    trainer = transformers.Trainer(model=model, args=lm_args(tmp_path, max_steps=3), train_dataset=lm_examples())
    with pytest.raises(RuntimeError, match="share memory"):
        trainer.train()


@pytest.mark.parametrize("kind", sorted(CAUSAL))
def test_checkpoints_are_adapter_only_and_resume_exactly(kind: str, tmp_path: Path) -> None:
    from safetensors import safe_open

    from peftkit.train.callbacks import HFAdapterTrainer

    data = lm_examples()
    # uninterrupted: 6 steps, checkpoints at 3 and 6 (dropout on: the resumed run must restore the RNG too)
    full = causal_model(kind, dropout=0.1)
    base_before = {n: p.detach().clone() for n, p in full.named_parameters() if not p.requires_grad}
    trainer = HFAdapterTrainer(model=full, args=lm_args(tmp_path / "full"), train_dataset=data)
    trainer.train()
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert (ckpt / "adapter.json").is_file() and (ckpt / "adapter.safetensors").is_file()
    assert not [f.name for f in ckpt.iterdir() if f.name.startswith(("model", "pytorch_model"))]
    with safe_open(str(ckpt / "adapter.safetensors"), "pt") as fh:
        saved = set(fh.keys())
    assert saved == set(adapter_values(full)), "the checkpoint holds exactly the adapter's tensors"
    n_adapter = sum(t.numel() for t in adapter_values(full).values())
    assert (ckpt / "adapter.safetensors").stat().st_size < 4 * n_adapter + 4096  # no base weight rides along
    for n, p in full.named_parameters():
        if n in base_before:
            assert torch.equal(p, base_before[n])
    # the final checkpoint reloads into a fresh base with the trained values
    reloaded = pk.load(CAUSAL[kind][0](), tmp_path / "full" / "checkpoint-6")
    for k, t in adapter_values(full).items():
        assert torch.equal(reloaded.adapter_state_dict("default")[k], t)

    # interrupted after step 3, resumed in a fresh process-like setting (new model, new trainer)
    resumed = causal_model(kind, dropout=0.1)
    first = adapter_values(resumed)
    trainer2 = HFAdapterTrainer(model=resumed, args=lm_args(tmp_path / "resumed"), train_dataset=data)
    trainer2.train(resume_from_checkpoint=str(ckpt))
    assert trainer2.state.global_step == 6
    want, got = adapter_values(full), adapter_values(resumed)
    assert any(not torch.equal(first[k], got[k]) for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6 * want[k].abs().max().item())
    # the resumed state carries the first 3 logged losses over from the checkpoint; steps 4-6 are new
    assert losses(trainer2)[3:] == pytest.approx(losses(trainer)[3:], rel=1e-6)


def test_resume_refuses_a_checkpoint_of_another_adapter_config(tmp_path: Path) -> None:
    from peftkit.errors import AdapterFileError
    from peftkit.train.callbacks import HFAdapterTrainer

    trained = causal_model("llama")
    HFAdapterTrainer(model=trained, args=lm_args(tmp_path / "a", max_steps=3), train_dataset=lm_examples()).train()
    other = pk.adapt(tiny_llama(), pk.LoRAConfig(r=8, alpha=8, targets=["q_proj", "v_proj"], seed=0))
    before = adapter_values(other)
    trainer = HFAdapterTrainer(model=other, args=lm_args(tmp_path / "b"), train_dataset=lm_examples())
    with pytest.raises(AdapterFileError, match="was saved with the config"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    for k, t in adapter_values(other).items():
        assert torch.equal(t, before[k])


def test_restore_adapters_is_all_or_nothing(tmp_path: Path) -> None:
    from peftkit.errors import AdapterFileError
    from peftkit.train.callbacks import restore_adapters

    model = causal_model("llama")
    model.add_adapter("b", pk.LoRAConfig(r=2, targets=["q_proj"], seed=1))
    model.save(tmp_path / "both")
    saved = {n: {k: t.clone() for k, t in model.adapter_state_dict(n).items()} for n in ("default", "b")}
    with torch.no_grad():
        for n in ("default", "b"):
            for t in model.adapter_state_dict(n).values():
                t.add_(1.0)
    changed = {n: {k: t.clone() for k, t in model.adapter_state_dict(n).items()} for n in ("default", "b")}
    assert restore_adapters(model, tmp_path / "both") == ["default", "b"]
    for n in saved:
        for k, t in model.adapter_state_dict(n).items():
            assert torch.equal(t, saved[n][k])

    # corrupt the second adapter's tensors: nothing is written, the first keeps its values too
    from safetensors.torch import load_file, save_file

    with torch.no_grad():
        for n in ("default", "b"):
            for k, t in model.adapter_state_dict(n).items():
                t.copy_(changed[n][k])
    file = tmp_path / "both" / "b" / "adapter.safetensors"
    tensors = load_file(str(file))
    key = sorted(tensors)[0]
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, str(file))
    with pytest.raises(AdapterFileError):
        restore_adapters(model, tmp_path / "both")
    for n in changed:
        for k, t in model.adapter_state_dict(n).items():
            assert torch.equal(t, changed[n][k]), (n, k)

    missing = causal_model("llama")
    with pytest.raises(AdapterFileError, match="does not have"):
        restore_adapters(missing, tmp_path / "both")
    with pytest.raises(AdapterFileError, match="holds no peftkit adapter"):
        restore_adapters(missing, tmp_path)


def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path: Path) -> None:
    from peftkit.train.callbacks import HFAdapterTrainer

    model = causal_model("gpt2")
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    class Snap(transformers.TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            snapshots[state.global_step] = adapter_values(model)

    args = lm_args(
        tmp_path,
        learning_rate=0.5,  # large: the eval loss gets worse after a few steps, so the best is not the last
        eval_strategy="steps",
        eval_steps=3,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        max_steps=9,
    )
    data = lm_examples()
    trainer = HFAdapterTrainer(model=model, args=args, train_dataset=data, eval_dataset=data[:16], callbacks=[Snap()])
    trainer.train()
    best = int(Path(trainer.state.best_model_checkpoint).name.split("-")[1])
    assert best != 9, "the test needs a best checkpoint that is not the last one"
    for k, t in adapter_values(model).items():
        assert torch.equal(t, snapshots[best][k])


def test_evaluation_sees_the_base_models_labels(tmp_path: Path) -> None:
    """transformers.Trainer reads label names from the model's class; AdaptedModel's class shows none, so the
    plain Trainer evaluates without eval_loss and hands compute_metrics no labels. HFAdapterTrainer reads them
    from the base model."""
    from peftkit.train.callbacks import HFAdapterTrainer

    cfg = pk.LoRAConfig(r=4, alpha=8, targets=["query", "value"], seed=0)
    data = [{k: v for k, v in d.items() if k != "idx"} for d in examples(16)]
    seen: list[Any] = []

    def metrics(pred: Any) -> dict[str, float]:
        seen.append(pred.label_ids)
        return {"acc": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=True)
    plain = transformers.Trainer(model=pk.adapt(tiny_bert(num_labels=2), cfg), args=args, compute_metrics=metrics)
    assert "eval_loss" not in plain.evaluate(data)  # the gap HFAdapterTrainer closes
    model = pk.adapt(tiny_bert(num_labels=2), cfg)
    result = HFAdapterTrainer(model=model, args=args, compute_metrics=metrics).evaluate(data)
    assert result["eval_loss"] == pytest.approx(mean_loss(model, data), rel=1e-5)
    assert seen[-1] is not None and seen[-1].tolist() == [int(d["labels"]) for d in data]
    assert 0.0 <= result["eval_acc"] <= 1.0


# ------------------------------------------------------------------ gradient checkpointing, bf16 autocast


def adapter_grads(model: pk.AdaptedModel, **kwargs: Any) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=ids, **kwargs).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def nonzero_b(model: pk.AdaptedModel) -> pk.AdaptedModel:
    """LoRA's B starts at zero, so A would get no gradient: give B values so both factors are compared."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.normal_(generator=torch.Generator().manual_seed(3))
    return model


@pytest.mark.parametrize("kind", sorted(CAUSAL))
@pytest.mark.parametrize("reentrant", [None, True, False])
def test_gradient_checkpointing_keeps_the_adapter_gradients(kind: str, reentrant: bool | None) -> None:
    """``model.gradient_checkpointing_enable()`` reaches the base model through attribute fall-through; the
    adapters inside the checkpointed blocks get the gradients they get without it (reentrant checkpointing
    needs inputs that require grad: transformers turns that on for input_ids models)."""
    want = adapter_grads(nonzero_b(causal_model(kind, dropout=0.1)))
    model = nonzero_b(causal_model(kind, dropout=0.1))
    kwargs = {} if reentrant is None else {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    with pytest.warns(FutureWarning):  # transformers 5 renamed it activation_checkpointing_enable
        model.gradient_checkpointing_enable(**kwargs)
    assert model.get_base_model().is_gradient_checkpointing
    got = adapter_grads(model)
    assert set(got) == set(want) and len(want) == 4 * len(CAUSAL[kind][1])  # A and B of every adapted module
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6 * want[k].abs().max().item())


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_with_per_row_adapter_ids(reentrant: bool) -> None:
    """The backward recomputes checkpointed blocks after forward returned: they must run with the same
    per-row adapters (AdaptedModel keeps a forward's context until the next call when gradients are on)."""

    def two() -> pk.AdaptedModel:
        model = nonzero_b(causal_model("llama"))
        model.add_adapter("b", pk.LoRAConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], seed=1))
        model.set_adapter(["default", "b"])
        return nonzero_b(model)

    ids = torch.tensor([0, 1, 0, 1])
    want = adapter_grads(two(), adapter_ids=ids)
    model = two()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    got = adapter_grads(model, adapter_ids=ids)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6 * want[k].abs().max().item())


def test_trainer_gradient_checkpointing_and_bf16_autocast_on_cpu(tmp_path: Path) -> None:
    """``TrainingArguments(gradient_checkpointing=True)`` and ``bf16=True`` on CPU (autocast) train the adapters:
    checkpointing alone reproduces the plain run's losses; under bf16 autocast the base matmuls run in bf16,
    the adapter parameters stay float32 and the losses stay within bf16 rounding of the float32 run."""
    from peftkit.train.callbacks import HFAdapterTrainer

    data = lm_examples(8)  # one batch, seen every step: the loss falls step by step
    runs: dict[str, tuple[list[float], dict[str, torch.Tensor]]] = {}
    dtypes: set[torch.dtype] = set()
    for name, kw in {
        "fp32": {},
        "checkpointing": {"gradient_checkpointing": True},
        "bf16": {"bf16": True},
    }.items():
        model = causal_model("llama")
        if name == "bf16":
            proj = model.get_base_model().model.layers[0].mlp.down_proj
            proj.register_forward_hook(lambda m, a, out: dtypes.add(out.dtype))
        args = lm_args(tmp_path / name, save_strategy="no", learning_rate=5e-2, **kw)
        trainer = HFAdapterTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
        runs[name] = (losses(trainer), adapter_values(model))
        assert {t.dtype for t in runs[name][1].values()} == {torch.float32}
    assert dtypes == {torch.bfloat16}
    fp32, ckpt, bf16 = runs["fp32"][0], runs["checkpointing"][0], runs["bf16"][0]
    assert ckpt == pytest.approx(fp32, rel=1e-5)
    assert bf16 == pytest.approx(fp32, rel=5e-3)  # bf16 rounds to 2^-9 relative; measured: 2.5e-4
    assert fp32[-1] < fp32[0] - 0.05 and bf16[-1] < bf16[0] - 0.05  # both train
