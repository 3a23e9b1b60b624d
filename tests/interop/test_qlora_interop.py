"""PEFT QLoRA adapters in and out of peftkit (issue 15 item 2).

* An adapter trained by PEFT's usual QLoRA path (transformers' ``BitsAndBytesConfig`` nf4 base,
  ``peft.prepare_model_for_kbit_training``, ``get_peft_model``, a few AdamW steps) and written by PEFT's
  ``save_pretrained`` imports with :func:`peftkit.interop.import_peft` onto the same nf4 base and gives PEFT's
  outputs;
* an adapter trained by peftkit on the nf4 base, written by :func:`peftkit.interop.export_peft`, loads with
  ``peft.PeftModel.from_pretrained`` onto the nf4 base (as PEFT's QLoRA layer) and gives peftkit's outputs.

Outputs agree within 1e-5 relative to their magnitude. The base is a tiny ``LlamaForCausalLM`` built from a config,
saved, and loaded back in nf4 each time it is needed (quantisation is deterministic: every copy holds the same
bytes). bitsandbytes' AVX512-BF16 eval shortcut is off on every copy, as peftkit's quantised view leaves it (see
``test_qlora_parity``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from _tiny_lm import model as tiny_llama
from torch import Tensor, nn

import peftkit as pk
from peftkit.core.quant import QuantizedViewMixin
from peftkit.interop import PEFT_CONFIG_FILE, export_peft, import_peft

pytestmark = pytest.mark.usefixtures("one_thread")

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RTOL = 1e-5


@pytest.fixture
def nf4_base(tmp_path: Path):
    """A function giving a fresh nf4 (double quantisation, float32 compute) copy of the same tiny Llama."""
    folder = tmp_path / "tiny"
    tiny_llama(400).save_pretrained(folder)
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )

    def load() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = transformers.AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=config, device_map="cpu"
            )
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
        return model

    return load


def ids() -> Tensor:
    return torch.randint(0, 400, (4, 12), generator=torch.Generator().manual_seed(1))


def train(model: nn.Module, steps: int = 3) -> float:
    """A few AdamW steps of language modelling on :func:`ids` (moves ``B`` off zero); returns the last loss."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids(), labels=ids()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return float(loss)


@torch.no_grad()
def logits(model: nn.Module) -> Tensor:
    return model.eval()(input_ids=ids()).logits


def close(got: Tensor, want: Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * float(want.abs().max()))


def adapter_effect(want: Tensor, base: nn.Module) -> float:
    return float((want - logits(base)).abs().max() / want.abs().max())


def test_a_peft_qlora_adapter_imports_with_peft_outputs(nf4_base, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = peft.prepare_model_for_kbit_training(nf4_base())
        theirs = peft.get_peft_model(
            prepared,
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.05, task_type="CAUSAL_LM"),
        )
        assert isinstance(theirs.base_model.model.model.layers[0].mlp.up_proj, peft.tuners.lora.bnb.Linear4bit)
        train(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    want = logits(theirs)

    ours = import_peft(nf4_base(), tmp_path / "peft")
    layer = ours.adapted_layer("model.layers.1.mlp.down_proj")
    assert isinstance(layer.base, QuantizedViewMixin)  # adapted on the nf4 layer, not a float copy
    close(logits(ours), want)
    assert adapter_effect(want, nf4_base()) > 0.01  # the trained adapter matters


def test_a_peftkit_adapter_on_nf4_exports_and_loads_in_peft(nf4_base, tmp_path: Path) -> None:
    ours = pk.adapt(nf4_base(), pk.LoRAConfig(r=4, alpha=8, dropout=0.05, targets=TARGETS))
    train(ours)
    want = logits(ours)
    export_peft(ours, tmp_path / "ours", task_type="CAUSAL_LM")
    assert (tmp_path / "ours" / PEFT_CONFIG_FILE).is_file()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(nf4_base(), tmp_path / "ours")
    assert isinstance(theirs.base_model.model.model.layers[0].self_attn.q_proj, peft.tuners.lora.bnb.Linear4bit)
    close(logits(theirs), want)
    assert adapter_effect(want, nf4_base()) > 0.01
