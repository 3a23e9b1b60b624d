"""QLoRA parity (issue 15 item 2): the same bitsandbytes nf4 weights under peftkit LoRA and under Hugging Face PEFT's
QLoRA layer (``peft.tuners.lora.bnb.Linear4bit``) give the same outputs and the same gradients of every LoRA ``A``
and ``B`` (within 1e-5 relative to their magnitude), with identical non-zero adapter weights in both.

The model is quantised once and deep-copied, so both sides hold the same packed nibbles and quantisation state and
the comparison measures only the adapter path. bitsandbytes' AVX512-BF16 eval shortcut (which repacks the weight in
place and computes in bfloat16) is off on both copies, as ``peftkit.quantize`` and peftkit's quantised view leave
it: otherwise the comparison would measure bfloat16 rounding in the base, not the adapters.

* a tiny ``LlamaForCausalLM`` built from a config and quantised by transformers' ``BitsAndBytesConfig`` (the usual
  QLoRA loading path; nf4, double quantisation, float32 and bfloat16 compute dtypes), fast;
* SmolLM2-135M (:func:`peftkit.assets.load_smollm2`) quantised by :func:`peftkit.quantize.quantize` (``slow``).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from _tiny_lm import model as tiny_llama
from torch import Tensor, nn

import peftkit as pk
from peftkit.quantize import quantize

pytestmark = pytest.mark.usefixtures("one_thread")

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RTOL = 1e-5


def no_bf16_shortcut(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def tiny_nf4(tmp_path: Path, compute_dtype: torch.dtype) -> nn.Module:
    """A 2-layer Llama saved and loaded back in nf4 (double quantisation) by transformers."""
    tiny_llama(400).save_pretrained(tmp_path / "tiny")
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "tiny", quantization_config=config, device_map="cpu"
        )
    return no_bf16_shortcut(model)


def peft_key(name: str) -> str:
    """PEFT's parameter name -> peftkit's (``...q_proj.lora_A.default.weight`` -> ``...q_proj.adapters.default.A``)."""
    path = name.removeprefix("base_model.model.")
    for suffix, ours in (
        (".lora_A.default.weight", ".adapters.default.A"),
        (".lora_B.default.weight", ".adapters.default.B"),
    ):
        if path.endswith(suffix):
            return "model." + path.removesuffix(suffix) + ours
    raise AssertionError(f"unexpected trainable PEFT parameter {name}")


def both(
    base: nn.Module, r: int = 4, alpha: float = 8.0
) -> tuple[pk.AdaptedModel, nn.Module, dict[str, tuple[Tensor, Tensor]]]:
    """peftkit LoRA and PEFT LoRA on deep copies of ``base``, with the same random (non-zero ``B``) adapter weights;
    ``{peft name: (our parameter, PEFT's parameter)}``."""
    ours = pk.adapt(copy.deepcopy(base), pk.LoRAConfig(r=r, alpha=alpha, targets=TARGETS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0)
        )
    layer = theirs.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, peft.tuners.lora.bnb.Linear4bit)  # PEFT's QLoRA layer, not its generic one
    mine = dict(ours.named_parameters())
    pairs = {n: (mine[peft_key(n)], p) for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(pairs) == 2 * len(TARGETS) * len(base.model.layers)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {peft_key(n) for n in pairs}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for a, b in pairs.values():
            b.copy_(0.05 * torch.randn(b.shape, generator=g))
            a.copy_(b)
    return ours, theirs, pairs


def close(got: Tensor, want: Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * float(want.abs().max()))


def check_parity(base: nn.Module, ids: Tensor) -> float:
    """Outputs in eval (no grad) and in training, loss, and the gradient of every LoRA ``A`` / ``B``; returns how
    much the adapters change the logits (relative), so the caller can check they matter."""
    ours, theirs, pairs = both(base)
    with torch.no_grad():
        got, want = ours.eval()(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits
        with ours.adapters_disabled():
            plain = ours(input_ids=ids).logits
    close(got, want)
    ours.train(), theirs.train()
    lo, lt = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
    close(lo.logits.detach(), lt.logits.detach())
    close(lo.loss.detach(), lt.loss.detach())
    lo.loss.backward()
    lt.loss.backward()
    for name, (a, b) in pairs.items():
        assert b.grad is not None and float(b.grad.abs().max()) > 0, name
        close(a.grad, b.grad)
    return float((want - plain).abs().max() / want.abs().max())


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_qlora_matches_peft_on_a_tiny_llama(tmp_path: Path, compute_dtype: torch.dtype) -> None:
    base = tiny_nf4(tmp_path, compute_dtype)
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(1))
    assert check_parity(base, ids) > 0.01  # the adapter matters


def test_peftkit_quantize_stores_what_transformers_stores(tmp_path: Path) -> None:
    """``peftkit.quantize`` (the slow test's and ``peftkit train --quantize``'s path) gives the same packed nf4 bytes
    and quantisation state as transformers' ``BitsAndBytesConfig`` on the same float weights."""
    theirs = tiny_nf4(tmp_path, torch.float32)
    ours = tiny_llama(400)
    quantize(ours, "nf4")
    for name, module in theirs.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            mine = ours.get_submodule(name)
            assert isinstance(mine, bnb.nn.Linear4bit)
            assert torch.equal(mine.weight.data, module.weight.data), name
            a, b = mine.weight.quant_state, module.weight.quant_state
            assert (a.quant_type, a.blocksize, a.nested, a.dtype) == (b.quant_type, b.blocksize, b.nested, b.dtype)
            assert torch.equal(a.absmax, b.absmax) and torch.equal(a.state2.absmax, b.state2.absmax), name


@pytest.mark.slow
def test_qlora_matches_peft_on_smollm2() -> None:
    """The real SmolLM2-135M (30 layers, 210 adapted linears), quantised by ``peftkit.quantize``; PEFT picks its QLoRA
    layer when the model says it is loaded in 4 bits (transformers sets ``is_loaded_in_4bit``)."""
    from peftkit.assets import load_smollm2

    base, tokenizer = load_smollm2()
    quantize(base, "nf4")
    base.is_loaded_in_4bit = True
    ids = tokenizer(["The movie was wonderful and the acting was great."], return_tensors="pt")["input_ids"]
    assert check_parity(base, ids) > 0.01
