"""Quantise a model's frozen linear layers for QLoRA-style training (Dettmers et al., 2023, "QLoRA: Efficient
Finetuning of Quantized LLMs"): ``peftkit train --quantize nf4|fp4|int8|hqq4`` and :func:`quantize`.

Each ``nn.Linear`` (except the output heads named in ``skip``) is replaced by the backend's own layer built from
its weights: bitsandbytes ``Linear4bit`` (``nf4`` / ``fp4``, double quantisation, computing in the layer's float
dtype), bitsandbytes ``Linear8bitLt`` (``int8``: LLM.int8() weights, no outlier threshold on CPU), or hqq's
``HQQLinear`` (``hqq4``: 4-bit codes in groups of 64 inputs). Adapters then see these layers through the core's
quantised view (:mod:`peftkit.core.quant`). The backends come with ``pip install 'peftkit[quant]'``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from peftkit.core.errors import InvalidConfigError
from peftkit.core.quant_backends import import_backend

SCHEMES = ("nf4", "fp4", "int8", "hqq4")
# Output heads stay in full precision (as in QLoRA): the LM head, a classification head, a score head.
DEFAULT_SKIP = ("lm_head", "classifier", "score")


def check_scheme(scheme: str) -> str:
    """``scheme`` if it is one of :data:`SCHEMES`.

    Raises:
        InvalidConfigError: another name (the message lists the schemes).
    """
    if scheme not in SCHEMES:
        raise InvalidConfigError(f"unknown quantisation {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return scheme


@torch.no_grad()
def quantize_linear(linear: nn.Linear, scheme: str) -> nn.Module:
    """A quantised copy of ``linear`` (left as it was) in the backend layer of ``scheme``."""
    check_scheme(scheme)
    dtype = linear.weight.dtype
    if scheme == "hqq4":
        hqq = import_backend("hqq.core.quantize")
        group = 64 if linear.in_features % 64 == 0 else linear.in_features
        config = hqq.BaseQuantizeConfig(nbits=4, group_size=group, axis=1)
        layer = hqq.HQQLinear(linear, config, compute_dtype=dtype, device=str(linear.weight.device), del_orig=False)
        # del_orig=False leaves ``linear`` untouched (True would set its parameters to None) but keeps it as the
        # submodule ``linear_layer``: the float weights would stay in the model next to the 4-bit codes (more
        # memory than the float base, not less) and appear as an extra nn.Linear; hqq reads it only while
        # quantising, in the constructor
        layer.linear_layer = None
        if layer.bias is not None:  # hqq clones the bias with its autograd history; a frozen base holds a plain one
            layer.bias = layer.bias.detach()
        return layer
    bnb = import_backend("bitsandbytes")
    bias = linear.bias is not None
    if scheme == "int8":
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False, threshold=0.0
        )
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=bias, quant_type=scheme, compress_statistics=True,
            compute_dtype=dtype,
        )  # fmt: skip
    layer.load_state_dict(linear.state_dict())
    if scheme != "int8":
        # bitsandbytes' CPU fast path for eval repacks the weight for AVX512-BF16: it computes in bfloat16 (not the
        # layer's dtype) and fails on layers narrower than its block; the core's view turns it off on the layers it
        # adapts, and the layers it does not adapt must compute the same way
        layer.support_avx512bf16_for_cpu = False
    return layer.to(linear.weight.device)  # bitsandbytes quantises when the layer is moved to its device


def quantize(model: nn.Module, scheme: str, skip: Sequence[str] = DEFAULT_SKIP) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (in place) whose name's last part is not in ``skip`` by its
    quantised copy (:func:`quantize_linear`); returns the paths replaced. Call it before adapting the model.

    Raises:
        InvalidConfigError: an unknown ``scheme``, or no linear layer to quantise.
        ModuleNotFoundError: the backend is not installed (the message names ``peftkit[quant]``).
    """
    check_scheme(scheme)
    paths = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in skip
    ]
    if not paths:
        raise InvalidConfigError(f"--quantize {scheme}: the model has no nn.Linear layer to quantise")
    for path in paths:
        parent, _, child = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, quantize_linear(owner.get_submodule(child), scheme))
    return paths
