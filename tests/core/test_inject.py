"""Target selection (names, suffixes, regexes, all-linear, exclude), modules_to_save and wrapping."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyNet, make_tiny_net, tiny_bert, tiny_gpt2

import peftkit as pk


def adapted_paths(model: pk.AdaptedModel, name: str = "default") -> list[str]:
    return sorted(model.layer_paths[name])


def test_targets_by_suffix_match_every_layer() -> None:
    model = pk.adapt(tiny_bert(), pk.LoRAConfig(r=2, targets=["query", "value"]))
    assert adapted_paths(model) == sorted(
        f"encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")
    )


def test_targets_by_full_path_match_one_layer() -> None:
    model = pk.adapt(tiny_bert(), pk.LoRAConfig(r=2, targets=["encoder.layer.1.attention.self.query"]))
    assert adapted_paths(model) == ["encoder.layer.1.attention.self.query"]


def test_suffix_matches_whole_name_parts_only() -> None:
    model = pk.adapt(tiny_bert(), pk.LoRAConfig(r=2, targets=["dense"]))
    assert all(p.split(".")[-1] == "dense" for p in adapted_paths(model))
    with pytest.raises(pk.errors.TargetModuleNotFound):
        pk.adapt(tiny_bert(), pk.LoRAConfig(r=2, targets=["uery"]))  # not a suffix of a name part


def test_targets_by_regex_fullmatch() -> None:
    model = pk.adapt(tiny_bert(), pk.LoRAConfig(r=2, targets=r"encoder\.layer\.0\..*\.(query|key)"))
    assert adapted_paths(model) == ["encoder.layer.0.attention.self.key", "encoder.layer.0.attention.self.query"]


def test_all_linear_tiny_net_excludes_the_head(tiny_net: TinyNet) -> None:
    model = pk.adapt(tiny_net, pk.LoRAConfig(r=2))
    assert adapted_paths(model) == ["fc1", "fc2"]  # not the head, not the conv, not the embedding


def test_all_linear_gpt2_covers_conv1d_excludes_lm_head() -> None:
    model = pk.adapt(tiny_gpt2(), pk.LoRAConfig(r=2, targets="all-linear"))
    paths = adapted_paths(model)
    assert "lm_head" not in paths
    assert len(paths) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block
    assert all(p.rsplit(".", 1)[-1] in ("c_attn", "c_proj", "c_fc") for p in paths)


def test_all_linear_bert_classifier_excludes_the_classifier() -> None:
    model = pk.adapt(tiny_bert(num_labels=3), pk.LoRAConfig(r=2, targets="all-linear"))
    paths = adapted_paths(model)
    assert "classifier" not in paths
    assert "bert.pooler.dense" in paths and "bert.encoder.layer.0.attention.self.query" in paths


def test_exclude_by_suffix_and_regex(tiny_net: TinyNet) -> None:
    model = pk.adapt(make_tiny_net(), pk.LoRAConfig(r=2, exclude=["fc2"]))
    assert adapted_paths(model) == ["fc1"]
    model = pk.adapt(tiny_bert(), pk.LoRAConfig(r=2, targets=["query", "value"], exclude=r".*layer\.1\..*"))
    assert adapted_paths(model) == ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]


def test_exclude_everything_raises(tiny_net: TinyNet) -> None:
    with pytest.raises(pk.errors.TargetModuleNotFound):
        pk.adapt(tiny_net, pk.LoRAConfig(r=2, targets=["fc1"], exclude=["fc1"]))


def test_modules_to_save_trains_the_whole_module(tiny_net: TinyNet, token_batch, tmp_path) -> None:
    model = pk.adapt(tiny_net, pk.LoRAConfig(r=2, targets=["fc1"], modules_to_save=["head"])).eval()
    assert adapted_paths(model) == ["fc1", "head"]
    assert type(model.adapter_modules("default")["head"]).method == "full"
    head = tiny_net.get_submodule("head").base_layer
    lora_count = 2 * (16 + 32)
    assert model.trainable_parameters().trainable == lora_count + head.weight.numel() + head.bias.numel()
    with torch.no_grad():  # identity at init: the dense delta of the head starts at zero
        torch.testing.assert_close(model(token_batch), make_tiny_net()(token_batch), atol=0, rtol=0)
    with torch.no_grad():
        for a in model.adapter_modules("default").values():
            for p in a.parameters():
                p.add_(0.1)
    out = model(token_batch)
    model.save(tmp_path / "ad")
    loaded = pk.load(make_tiny_net(), tmp_path / "ad").eval()
    assert adapted_paths(loaded) == ["fc1", "head"]
    torch.testing.assert_close(loaded(token_batch), out, atol=0, rtol=0)
    plain = loaded.merge()
    torch.testing.assert_close(plain(token_batch), out, atol=1e-5, rtol=0)


def test_modules_to_save_is_not_also_a_lora_target(tiny_net: TinyNet) -> None:
    model = pk.adapt(tiny_net, pk.LoRAConfig(r=2, targets=r"fc1|head", modules_to_save=["head"]))
    kinds = {p: type(a).method for p, a in model.adapter_modules("default").items()}
    assert kinds == {"fc1": "lora", "head": "full"}
