"""PEFT names people type by habit work with PEFT's meaning or say what to use; ``generate`` takes per-row
adapters."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_net, tiny_gpt2

import peftkit as pk
from peftkit.errors import AdapterIdsError


def lora(**kw) -> pk.LoRAConfig:
    return pk.LoRAConfig(**{"r": 4, "alpha": 8, "targets": ["c_attn", "c_fc"], **kw})


def randomised(model: pk.AdaptedModel, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in model.adapter_modules(name).values():
            adapter.B.copy_(torch.randn(adapter.B.shape, generator=g))


@pytest.fixture
def gpt2() -> pk.AdaptedModel:
    model = pk.adapt(tiny_gpt2(), lora(seed=1), name="a")
    model.add_adapter("b", lora(seed=2))
    randomised(model, "a", 1)
    randomised(model, "b", 2)
    return model.eval()


def test_save_pretrained_saves_the_adapters_not_the_base(gpt2, tmp_path) -> None:
    """It wrote the full base model with wrapper keys (reloading gave random weights)."""
    gpt2.save_pretrained(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "adapters.json", "b"]
    reloaded = pk.AdaptedModel.from_pretrained(tiny_gpt2(), tmp_path / "out").eval()
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, adapter_ids=[0, 1]).logits, gpt2(ids, adapter_ids=[0, 1]).logits)
    gpt2.save_pretrained(tmp_path / "only_b", selected_adapters=["b"])
    assert pk.load(tiny_gpt2(), tmp_path / "only_b").adapter_names == ["b"]
    gpt2.save_pretrained(tmp_path / "not_main", is_main_process=False)
    assert not (tmp_path / "not_main").exists()
    with pytest.raises(TypeError, match=r"does not take \['push_to_hub'\]"):
        gpt2.save_pretrained(tmp_path / "x", push_to_hub=True)
    with pytest.raises(NotImplementedError, match=r"upload_folder"):
        gpt2.push_to_hub("me/model")


def test_merge_and_unload_disable_adapter_active_adapter(gpt2) -> None:
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        base = tiny_gpt2()(ids).logits
        adapted = gpt2(ids).logits
        assert gpt2.active_adapter == "a"
        with gpt2.disable_adapter():
            torch.testing.assert_close(gpt2(ids).logits, base, rtol=0, atol=0)
        torch.testing.assert_close(gpt2(ids).logits, adapted, rtol=0, atol=0)
        gpt2.set_adapter(["a", "b"])
        assert gpt2.active_adapter == ["a", "b"]
        both = gpt2(ids).logits
        gpt2.merge_adapter()
        torch.testing.assert_close(gpt2(ids).logits, both, rtol=1e-5, atol=1e-5 * both.abs().max().item())
        gpt2.unmerge_adapter()
        plain = gpt2.merge_and_unload()
        assert type(plain).__name__ == "GPT2LMHeadModel"
        torch.testing.assert_close(plain(ids).logits, both, rtol=1e-5, atol=1e-5 * both.abs().max().item())
    assert gpt2.get_nb_trainable_parameters()[1] > 0


@pytest.mark.parametrize(
    ("name", "hint"),
    [("peft_config", r"model\.configs"), ("disable_adapter_layers", r"disable_adapters\(\)"), ("nope", r"GPT2LMHead")],
)
def test_missing_attribute_names_the_peftkit_equivalent(gpt2, name, hint) -> None:
    with pytest.raises(AttributeError, match=rf"'AdaptedModel' object has no attribute '{name}'.*{hint}"):
        getattr(gpt2, name)
    assert not hasattr(gpt2, name)


def test_generate_with_one_adapter_per_prompt(gpt2) -> None:
    """``generate(adapter_ids=...)`` failed with "model_kwargs are not used"; each prompt must decode as with
    its adapter alone, also when generate expands rows (beams)."""
    prompts = torch.randint(0, 64, (3, 5))
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    out = gpt2.generate(prompts, adapter_ids=["b", None, "a"], **kw)
    for row, name in enumerate(["b", None, "a"]):
        if name is None:
            with gpt2.adapters_disabled():
                alone = gpt2.generate(prompts[row : row + 1], **kw)
        else:
            gpt2.set_adapter(name)
            alone = gpt2.generate(prompts[row : row + 1], **kw)
        assert torch.equal(out[row : row + 1], alone), f"row {row} ({name})"
    gpt2.set_adapter("a")
    beams = gpt2.generate(prompts[:2], adapter_ids=[1, 0], num_beams=2, num_return_sequences=2, **kw)
    gpt2.set_adapter("b")
    first = gpt2.generate(prompts[:1], num_beams=2, num_return_sequences=2, **kw)
    assert torch.equal(beams[:2], first)
    peft_style = gpt2.generate(prompts, adapter_names=["b", "__base__", "a"], **kw)
    assert torch.equal(peft_style, out)
    assert gpt2.routing.call.adapter_ids is None  # nothing left set after the call
    with pytest.raises(AdapterIdsError, match=r"2 entries but the batch has 3 rows"):
        gpt2.generate(prompts, adapter_ids=[0, 1], **kw)


def test_forward_takes_peft_adapter_names() -> None:
    model = pk.adapt(make_tiny_net(), pk.LoRAConfig(r=2, targets=["fc1"], seed=0)).eval()
    with torch.no_grad():
        for adapter in model.adapter_modules("default").values():
            adapter.B.normal_()
        ids = torch.randint(0, 40, (2, 5))
        torch.testing.assert_close(
            model(ids, adapter_names=["default", "__base__"]), model(ids, adapter_ids=[0, -1]), rtol=0, atol=0
        )
