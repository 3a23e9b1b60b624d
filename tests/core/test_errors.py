"""Bad input raises a specific ``peftkit.errors`` exception whose message names the problem."""

from __future__ import annotations

import json

import pytest
import torch
from _throwaway_methods import registered
from conftest import TinyNet, make_tiny_net, tiny_bert

import peftkit as pk
from peftkit.core.layer import AdaptedLayer
from peftkit.errors import (
    AdapterExistsError,
    AdapterFileError,
    AdapterIdsError,
    AdapterNameError,
    AdapterNotFoundError,
    AlreadyAdaptedError,
    BaseModelMismatch,
    FormatVersionError,
    InvalidConfigError,
    NotMergeableError,
    PeftkitError,
    TargetModuleNotFound,
    UnknownMethodError,
    UnsupportedLayerError,
)


def lora(**kw) -> pk.LoRAConfig:
    kw.setdefault("targets", ["fc1", "fc2"])
    return pk.LoRAConfig(r=2, **kw)


def snapshot(model: torch.nn.Module) -> dict:
    """Module objects, parameter values and flags: everything a failed call must leave as it was."""
    return {
        "modules": {n: m for n, m in model.named_modules()},
        "params": {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
    }


def assert_untouched(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"].keys() == before["modules"].keys()
    assert all(after["modules"][n] is m for n, m in before["modules"].items())
    for n, (p, grad) in before["params"].items():
        assert torch.equal(after["params"][n][0], p), n
        assert after["params"][n][1] == grad, f"{n}: requires_grad changed"


@pytest.fixture
def model(tiny_net: TinyNet) -> pk.AdaptedModel:
    return pk.adapt(tiny_net, lora()).eval()


@pytest.fixture
def saved(model: pk.AdaptedModel, tmp_path):
    path = tmp_path / "adapter"
    model.save(path)
    return path


def test_every_error_is_a_peftkit_error() -> None:
    for name in pk.errors.__all__:
        assert issubclass(getattr(pk.errors, name), PeftkitError)


# ------------------------------------------------------------------------------------------- methods, config
def test_unknown_method_lists_close_matches() -> None:
    with pytest.raises(UnknownMethodError, match=r"unknown method 'lroa' \(did you mean 'lora'"):
        pk.get_config("lroa")
    with pytest.raises(KeyError):  # generic handlers keep working
        pk.get_method("lroa")


@pytest.mark.parametrize(
    ("fields", "word"),
    [
        ({"r": 0}, r"r must lie in \[1, inf\), got 0"),
        ({"r": -3}, r"r must lie in \[1, inf\), got -3"),
        ({"r": 2.5}, "r must be an integer"),
        ({"alpha": float("nan")}, "alpha must be finite"),
        ({"alpha": float("inf")}, "alpha must be finite"),
        ({"alpha": -16}, "alpha must lie in .0, inf., got -16"),
        ({"alpha": "16"}, "alpha must be a number, got '16'"),
        ({"dropout": None}, "dropout must be a number"),
        ({"targets": None}, "targets is None"),
        ({"targets": ["query", 3]}, r"targets\[1\] must be a string"),
        ({"rank": 8}, "PEFT's 'rank' is 'r' in peftkit"),
        ({"lora_alpha": 16}, "PEFT's 'lora_alpha' is 'alpha' in peftkit"),
        ({"target_modules": ["q"]}, "PEFT's 'target_modules' is 'targets' in peftkit"),
        ({"lora_dropout": 0.1}, "PEFT's 'lora_dropout' is 'dropout' in peftkit"),
        ({"fan_in_fan_out": True}, "peftkit does not need"),
        ({"alhpa": 3}, "did you mean 'alpha'"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"init": "xavier"}, "init"),
        ({"targets": []}, "targets is empty"),
        ({"targets": "fc(["}, "not a valid regular expression"),
    ],
)
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_invalid_config_names_the_field(method: str, fields: dict, word: str) -> None:
    with pytest.raises(InvalidConfigError, match=word.replace("(", r"\(")):
        pk.get_config(method, **fields)


def test_positional_config_arguments_are_refused() -> None:
    with pytest.raises(InvalidConfigError, match=r"keyword arguments only"):
        pk.LoRAConfig(8)


def test_lorasb_alpha_follows_r() -> None:
    assert pk.get_config("lorasb", r=4).alpha == 4
    with pytest.raises(InvalidConfigError, match=r"alpha = r"):
        pk.get_config("lorasb", r=4, alpha=8)


def test_rank_larger_than_the_layer_allows(tiny_net: TinyNet) -> None:
    # head is Linear(24 -> 3): rank at most 3
    with pytest.raises(InvalidConfigError, match=r"head: r=4 is larger than this linear layer allows \(at most 3"):
        pk.adapt(tiny_net, pk.LoRAConfig(r=4, targets=["fc1", "head"]))


def test_unknown_config_field() -> None:
    with pytest.raises(InvalidConfigError, match=r"no field"):
        pk.LoRAConfig.from_dict({"r": 2, "rank": 4})


# ---------------------------------------------------------------------------------------------- targets
def test_unknown_target_lists_close_matches(tiny_net: TinyNet) -> None:
    with pytest.raises(TargetModuleNotFound, match=r"'fc3' matches no module.*did you mean 'fc[12]' or 'fc[12]'"):
        pk.adapt(tiny_net, lora(targets=["fc3"]))


def test_one_missing_target_among_several(tiny_net: TinyNet) -> None:
    with pytest.raises(TargetModuleNotFound, match=r"'qeury'.*did you mean 'query'"):
        pk.adapt(tiny_bert(), lora(targets=["query", "qeury"]))


def test_regex_matching_nothing(tiny_net: TinyNet) -> None:
    with pytest.raises(TargetModuleNotFound, match=r"fc\\\\d\{3\}"):
        pk.adapt(tiny_net, lora(targets=r"fc\d{3}"))


def test_plain_name_string_is_a_suffix_not_a_regex() -> None:
    """``targets="query"`` answered "did you mean 'query'" (a plain word was a regex over full paths)."""
    model = pk.adapt(tiny_bert(), lora(targets="query"))
    assert model.layer_paths["default"] == [f"encoder.layer.{i}.attention.self.query" for i in range(2)]
    dotted = pk.adapt(tiny_bert(), lora(targets="attention.self.query", exclude="layer.1.attention.self.query"))
    assert dotted.layer_paths["default"] == ["encoder.layer.0.attention.self.query"]
    regex = pk.adapt(tiny_bert(), lora(targets=r".*layer\.1\..*query"))
    assert regex.layer_paths["default"] == ["encoder.layer.1.attention.self.query"]
    with pytest.raises(TargetModuleNotFound, match=r"must match a full module path such as 'encoder\.layer"):
        pk.adapt(tiny_bert(), lora(targets=r"quer(y|ies)"))


def test_missing_module_to_save(tiny_net: TinyNet) -> None:
    with pytest.raises(TargetModuleNotFound, match=r"'haed'.*did you mean 'head'"):
        pk.adapt(tiny_net, lora(modules_to_save=["haed"]))


def test_dora_on_embedding_is_unsupported(tiny_net: TinyNet) -> None:
    with pytest.raises(UnsupportedLayerError, match=r"'dora' cannot adapt 'emb' \(Embedding\)"):
        pk.adapt(tiny_net, pk.DoRAConfig(r=2, targets=["emb"]))


def test_lora_on_layernorm_via_regex() -> None:
    with pytest.raises(UnsupportedLayerError, match=r"'lora' cannot adapt '.*LayerNorm' \(LayerNorm\)"):
        pk.adapt(tiny_bert(), lora(targets=r".*attention\.output\.LayerNorm"))


def test_lora_bias_on_embedding_is_unsupported(tiny_net: TinyNet) -> None:
    with pytest.raises(UnsupportedLayerError, match=r"emb: bias=True is not supported on an Embedding"):
        pk.adapt(tiny_net, lora(targets=["emb"], bias=True))


# ------------------------------------------------------------------------------------------ adapter names
def test_adapter_name_in_use(model: pk.AdaptedModel) -> None:
    with pytest.raises(AdapterExistsError, match=r"'default' already exists"):
        model.add_adapter("default", lora())


@pytest.mark.parametrize("call", ["set_adapter", "delete_adapter", "save", "adapter_modules"])
def test_adapter_name_not_found(model: pk.AdaptedModel, call: str) -> None:
    with pytest.raises(AdapterNotFoundError, match=r"no adapter named 'defualt' \(did you mean 'default'\?\)"):
        getattr(model, call)("defualt") if call != "save" else model.save("/nonexistent", names="defualt")


@pytest.mark.parametrize("name", ["a.b", "", "a b", "x" * 129, "ü", 3])
def test_invalid_adapter_name(model: pk.AdaptedModel, name) -> None:
    with pytest.raises(AdapterNameError, match=r"invalid adapter name"):
        model.add_adapter(name, lora())


def test_adapt_an_adapted_model(model: pk.AdaptedModel) -> None:
    with pytest.raises(AlreadyAdaptedError, match=r"already an AdaptedModel.*add_adapter"):
        pk.adapt(model, lora())


# ------------------------------------------------------------------------------------------- adapter_ids
@pytest.mark.parametrize(
    ("ids", "error"),
    [
        (torch.tensor([0, 0, 0]), "3 entries but the batch has 4 rows"),
        (torch.tensor([0.0, 0.0, 0.0, 0.0]), "integer tensor, got dtype torch.float32"),
        (torch.tensor([0, 1, 0, 0]), r"must lie in \[-1, 0\]"),
        (torch.tensor([0, -2, 0, 0]), r"must lie in \[-1, 0\]"),
        (torch.tensor([[0, 0, 0, 0]]), "1-D"),
    ],
)
def test_bad_adapter_ids(model: pk.AdaptedModel, token_batch, ids, error: str) -> None:
    with pytest.raises(AdapterIdsError, match=error):
        model(token_batch, adapter_ids=ids)
    assert model.routing.call.adapter_ids is None


def test_adapter_ids_unknown_name(model: pk.AdaptedModel, token_batch) -> None:
    with pytest.raises(AdapterNotFoundError, match=r"'b'"):
        model(token_batch, adapter_ids=["default", "b", None, "default"])


# ------------------------------------------------------------------------------------------- save / load
def test_load_onto_another_base(saved) -> None:
    other = TinyNet(dim=8)  # fc1 is Linear(8, 32) instead of Linear(16, 32)
    with pytest.raises(BaseModelMismatch, match=r"module 'fc1' differs.*\[32, 16\].*\[32, 8\]"):
        pk.load(other, saved)
    assert not any(isinstance(m, AdaptedLayer) for m in other.modules())


def test_load_onto_a_base_without_the_module(saved) -> None:
    with pytest.raises(BaseModelMismatch, match=r"module 'fc1'; this model has none"):
        pk.load(tiny_bert(), saved)


def test_truncated_weights(saved) -> None:
    file = saved / "adapter.safetensors"
    file.write_bytes(file.read_bytes()[:-7])
    with pytest.raises(AdapterFileError, match=r"adapter.safetensors is truncated or corrupted"):
        pk.load(make_tiny_net(), saved)


def test_corrupted_weights(saved) -> None:
    file = saved / "adapter.safetensors"
    data = bytearray(file.read_bytes())
    data[:8] = b"\xff" * 8  # header length now absurd
    file.write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match=r"truncated or corrupted"):
        pk.load(make_tiny_net(), saved)


def test_missing_weights(saved) -> None:
    (saved / "adapter.safetensors").unlink()
    with pytest.raises(AdapterFileError, match=r"adapter.safetensors is missing"):
        pk.load(make_tiny_net(), saved)


def test_not_an_adapter_folder(tmp_path) -> None:
    with pytest.raises(AdapterFileError, match=r"adapter.json is missing"):
        pk.load(make_tiny_net(), tmp_path)


@pytest.mark.parametrize("version", [2, 99, "1", None, 0])
def test_newer_or_unknown_format_version(saved, version) -> None:
    file = saved / "adapter.json"
    meta = json.loads(file.read_text())
    meta["format_version"] = version
    file.write_text(json.dumps(meta))
    with pytest.raises(FormatVersionError, match=f"format_version {version!r}"):
        pk.load(make_tiny_net(), saved)


def test_malformed_json(saved) -> None:
    file = saved / "adapter.json"
    file.write_text(file.read_text()[:-20])
    with pytest.raises(AdapterFileError, match=r"not valid JSON"):
        pk.load(make_tiny_net(), saved)


def test_saved_config_of_unknown_method(saved) -> None:
    file = saved / "adapter.json"
    meta = json.loads(file.read_text())
    meta["method"] = "lroa"
    file.write_text(json.dumps(meta))
    with pytest.raises(UnknownMethodError, match=r"did you mean 'lora'"):
        pk.load(make_tiny_net(), saved)


def test_saved_tensor_of_wrong_shape(saved) -> None:
    from safetensors.torch import load_file, save_file

    file = saved / "adapter.safetensors"
    tensors = load_file(str(file))
    tensors["fc1.A"] = torch.zeros(3, 16)
    save_file(tensors, str(file))
    meta = json.loads((saved / "adapter.json").read_text())
    del meta["weights_sha256"]  # an adapter edited by hand: no checksum to catch it, the shape check does
    (saved / "adapter.json").write_text(json.dumps(meta))
    base = make_tiny_net()
    with pytest.raises(AdapterFileError, match=r"'fc1.A' has shape"):
        pk.load(base, saved)
    assert not any(isinstance(m, AdaptedLayer) for m in base.modules())


def test_failed_save_leaves_previous_save_intact(model: pk.AdaptedModel, saved, token_batch, monkeypatch) -> None:
    import peftkit.core.io as io

    first = model(token_batch)
    with torch.no_grad():
        for a in model.adapter_modules("default").values():
            a.B.add_(1.0)
    assert not torch.allclose(model(token_batch), first)

    def failing_fsync(fd: int) -> None:
        raise OSError("No space left on device")  # the temporary file is half-written, then the disk fills up

    monkeypatch.setattr(io.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match=r"No space left"):
        model.save(saved)
    monkeypatch.undo()
    assert sorted(p.name for p in saved.parent.iterdir()) == ["adapter"]
    assert sorted(p.name for p in saved.iterdir()) == ["adapter.json", "adapter.safetensors"], "leftovers"
    reloaded = pk.load(make_tiny_net(), saved).eval()
    torch.testing.assert_close(reloaded(token_batch), first, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ merging
def test_merging_a_non_mergeable_method(tiny_net: TinyNet, token_batch) -> None:
    with registered("tanh_branch"):
        model = pk.adapt(tiny_net, pk.get_config("tanh_branch", targets=["fc1"])).eval()
        before = model(token_batch)
        with pytest.raises(NotMergeableError, match=r"method 'tanh_branch' .*cannot be merged"):
            model.merge()
        with pytest.raises(NotMergeableError):
            model.merge(unload=False)
        torch.testing.assert_close(model(token_batch), before, atol=0, rtol=0)


# ------------------------------------------------------------------------------- failures leave no trace
@pytest.mark.parametrize(
    "config",
    [
        lora(targets=["fc1", "nope"]),
        pk.LoRAConfig(r=4, targets=["fc1", "head"]),  # fc1 builds, head fails
        lora(targets=["fc1", "emb"], bias=True),  # fc1 builds, emb refuses
        pk.DoRAConfig(r=2, targets=["fc1", "emb"]),
    ],
    ids=["missing-target", "rank-too-large", "unsupported-setting", "unsupported-layer"],
)
def test_failed_add_adapter_leaves_the_model_untouched(model: pk.AdaptedModel, config, token_batch) -> None:
    before, out = snapshot(model), model(token_batch)
    names, active, paths = model.adapter_names, model.active_adapters, dict(model.layer_paths)
    with pytest.raises(PeftkitError):
        model.add_adapter("new", config)
    assert_untouched(model, before)
    assert (model.adapter_names, model.active_adapters, model.layer_paths) == (names, active, paths)
    torch.testing.assert_close(model(token_batch), out, atol=0, rtol=0)
    model.add_adapter("new", lora())  # the name is still free


def test_failed_adapt_leaves_the_base_untouched(tiny_net: TinyNet) -> None:
    before = snapshot(tiny_net)
    with pytest.raises(TargetModuleNotFound):
        pk.adapt(tiny_net, lora(targets=["nope"]))
    assert_untouched(tiny_net, before)


def test_failed_load_leaves_the_base_untouched(saved) -> None:
    base = TinyNet(dim=8)
    before = snapshot(base)
    with pytest.raises(BaseModelMismatch):
        pk.load(base, saved)
    assert_untouched(base, before)


def test_lora_bias_on_a_layer_without_bias_cannot_merge() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False))
    model = pk.adapt(net, pk.LoRAConfig(r=2, bias=True, targets=["0"]))
    weight = net[0].base_layer.weight.detach().clone()
    with pytest.raises(NotMergeableError, match=r"changes the bias but the base module has none"):
        model.merge()
    assert torch.equal(net[0].base_layer.weight, weight)  # as PEFT: "Impossible to merge ... no bias"


def test_mixed_batch_while_merged(model: pk.AdaptedModel, token_batch) -> None:
    model.merge(unload=False)
    with pytest.raises(AdapterIdsError, match=r"merged into the weights; unmerge them"):
        model(token_batch, adapter_ids=[0, 0, -1, 0])
    assert model.routing.call.adapter_ids is None
    model.unmerge()
    model(token_batch, adapter_ids=[0, 0, -1, 0])


def test_failed_merge_leaves_no_layer_merged() -> None:
    """The first layer can merge, the second cannot: merge() must not leave the model half merged."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4, bias=False))
    model = pk.adapt(net, pk.LoRAConfig(r=2, bias=True, targets=["0", "1"]))
    with torch.no_grad():
        for a in model.adapter_modules("default").values():
            a.B.normal_()
            a.bias.normal_()
    x = torch.randn(3, 4)
    before, out = snapshot(net), model(x)
    for unload in (True, False):
        with pytest.raises(NotMergeableError):
            model.merge(unload=unload)
        assert all(not layer.merged for layer in model.layers())
        for n, p in net.named_parameters():  # rolled back by unmerge: exact up to fp32 rounding (spec: 1e-6)
            torch.testing.assert_close(p.detach(), before["params"][n][0], atol=1e-6, rtol=0, msg=n)
        torch.testing.assert_close(model(x), out, atol=1e-5, rtol=0)
