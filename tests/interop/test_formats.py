"""``peftkit.interop.formats``: the PEFT format table is consistent with the methods it names, and its hooks
(the dense ``modules_to_save`` values, LoRA's conv check and init fix-up) compute what PEFT stores."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_tiny_net, tiny_gpt2
from torch import nn

import peftkit as pk
from peftkit.core.base import BaseView
from peftkit.errors import AdapterFileError, BaseModelMismatch
from peftkit.interop.formats import DENSE, PEFT_FORMATS, format_kind


@pytest.mark.parametrize("method", sorted(PEFT_FORMATS))
def test_entry_names_fields_of_its_method(method: str) -> None:
    """Every config field an entry names exists on the method's config (a typo would silently drop a setting),
    and every value map is one-to-one (the import inverts it)."""
    fmt = PEFT_FORMATS[method]
    fields = {f.name for f in dataclasses.fields(pk.get_method(method).config_class)}
    named = {*fmt.fields, *fmt.values, *fmt.patterns, *fmt.ignored}
    assert named <= fields, sorted(named - fields)
    for _, to_peft, _ in fmt.values.values():
        assert len({(type(v), v) for v in to_peft.values()}) == len(to_peft)
    assert set(fmt.tensors) <= {"linear", "conv1d", "conv2d", "embedding"}


def test_each_written_config_selects_its_own_entry() -> None:
    """A config carrying an entry's ``peft_type`` and ``select`` flags matches that entry and no other (LoRA and
    DoRA share ``LORA`` and differ by ``use_dora``; a missing flag counts as False)."""
    for method, fmt in PEFT_FORMATS.items():
        if fmt.peft_type is None:
            continue
        raw = {"peft_type": fmt.peft_type, **fmt.fixed, **fmt.select}
        assert [m for m, f in PEFT_FORMATS.items() if f.matches(raw)] == [method]
    assert PEFT_FORMATS["lora"].matches({"peft_type": "LORA"})  # written before use_dora existed
    assert not any(f.matches({"peft_type": "IA3"}) for f in PEFT_FORMATS.values())


def _dense_state(base: BaseView, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {"weight_delta": torch.randn(base.weight_shape, generator=g)}
    if base.bias is not None:
        state["bias_delta"] = torch.randn(base.out_features, generator=g)
    return state


@pytest.mark.parametrize(("factory", "path"), [(make_tiny_net, "fc1"), (make_tiny_net, "conv"), (tiny_gpt2, "c_fc")])
def test_dense_values_are_the_whole_module_and_back(factory, path: str) -> None:
    """``W + ΔW`` in the module's own layout (GPT-2 Conv1D: ``[in, out]``), ``b + Δb``; the import subtracts."""
    model = factory()
    module = next(m for n, m in model.named_modules() if n.split(".")[-1] == path)
    base = BaseView(module)
    state = _dense_state(base, 0)
    stored = DENSE.to_peft(base, state)
    assert stored["weight_delta"].shape == module.weight.shape
    torch.testing.assert_close(stored["bias_delta"], module.bias + state["bias_delta"], rtol=0, atol=0)
    if format_kind(base) == "conv1d":
        torch.testing.assert_close(stored["weight_delta"], module.weight + state["weight_delta"].T, rtol=0, atol=0)
    back = DENSE.from_peft(base, stored, "here")
    for k, t in state.items():
        torch.testing.assert_close(back[k], t, rtol=0, atol=1e-6 * float(stored[k].abs().max()))


def test_dense_refuses_a_module_of_another_shape_or_tensors() -> None:
    base = BaseView(nn.Linear(4, 3))
    with pytest.raises(BaseModelMismatch, match=r"here\.weight has shape \(3, 5\); this model's is \(3, 4\)"):
        DENSE.from_peft(base, {"weight_delta": torch.zeros(3, 5), "bias_delta": torch.zeros(3)}, "here")
    with pytest.raises(AdapterFileError, match=r"has tensors \['weight'\]; this model's has \['bias', 'weight'\]"):
        DENSE.from_peft(base, {"weight_delta": torch.zeros(3, 4)}, "here")


def test_lora_conv_check_and_init_fixup() -> None:
    lora = PEFT_FORMATS["lora"]
    assert lora.check_base(BaseView(nn.Conv2d(2, 3, 3, padding=1))) is None
    assert lora.check_base(BaseView(nn.Linear(2, 3))) is None
    for conv in (nn.Conv2d(2, 3, 3, dilation=2), nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")):
        assert "PEFT's LoRA for Conv2d ignores dilation" in lora.check_base(BaseView(conv))
    assert lora.check_base(BaseView(nn.Conv2d(2, 3, 3, padding="same"))) is not None
    written = {"lora_bias": True, "init_lora_weights": "gaussian"}
    lora.adjust(written)  # PEFT's LoraConfig refuses lora_bias with any init but True / False
    assert written["init_lora_weights"] is True
    written = {"lora_bias": False, "init_lora_weights": "gaussian"}
    lora.adjust(written)
    assert written["init_lora_weights"] == "gaussian"
