"""EoRA (Liu et al., 2024, "EoRA: Training-free Compensation for Compressed LLM with Eigenspace Low-Rank
Approximation"; official code NVlabs/EoRA, ``llama_sequential_eigen``).

A compressed weight ``W_c`` (pruned or quantised, :mod:`peftkit.compress.compressors`) leaves the error
``ΔW = W − W_c``. With the covariance of the layer's calibration inputs ``H = XᵀX / n = QΛQᵀ`` (negative
eigenvalues replaced by the smallest positive one, plus a damping of ``1e-6·mean(diag H)``: spec decision against
``1/√0`` on few tokens), EoRA projects ``ΔW' = ΔW·QΛ^{1/2}``, takes its truncated SVD ``U_r S_r V_rᵀ`` and returns

    B = U_r S_r^{1/2}   (out × r),     A = S_r^{1/2} V_rᵀ Λ^{-1/2} Qᵀ   (r × in),

the minimiser of the activation-weighted error ``‖(ΔW − BA)X̃ᵀ‖_F`` over rank-``r`` products (Eckart–Young in
the metric ``H``; with ``H = c·I`` it is the plain truncated SVD of ``ΔW``, the ``"svd"`` baseline). The scale of
``H`` does not change ``BA`` (we average over tokens; the official code averages per-sequence sums).

The result is an ordinary LoRA adapter (``alpha = r``: scale 1) on the compressed model, added with
:meth:`~peftkit.AdaptedModel.load_tensors`, so it saves, loads, serves, merges (``W_c + BA``, which gives up
sparsity) and exports to PEFT like any LoRA. Disabling it gives the uncompensated compressed model.

Calibration is sequential by default (official): blocks are processed in order, each block's inputs are the
outputs of the blocks before it *after* their compensation, and a block's sub-layer inputs are recorded with
its compressed weights. Models without LLaMA-style blocks (``targets`` given) are calibrated in one pass.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from peftkit.compress import arch, compressors
from peftkit.compress.data import check_calibration
from peftkit.compress.errors import CompressOptionError, UnknownArchitectureError, check_rank
from peftkit.core.model import AdaptedModel
from peftkit.init._calibration import Recorder, block_inputs, module_statistics, replay
from peftkit.lowrank import dense_svd, truncate
from peftkit.methods.lora import LoRAConfig

MODES = ("eigen", "svd")
DAMP = 1e-6


class Report(NamedTuple):
    """Activation-weighted relative errors ``‖EX̃ᵀ‖/‖WX̃ᵀ‖`` per layer: of the compressed weight (``E = W − W_c``)
    and of the compensated one (``E = W − W_c − BA``)."""

    before: dict[str, float]
    after: dict[str, float]


class Result(NamedTuple):
    """The compressed model with the compensation as LoRA adapter ``name`` (active), and the error report."""

    model: AdaptedModel
    report: Report


def _whitening(covariance: Tensor, damp: float = DAMP) -> tuple[Tensor, Tensor]:
    """``(QΛ^{1/2}, Λ^{-1/2}Qᵀ)`` of the damped, clamped input covariance (float64)."""
    h = covariance.double()
    h = h + damp * h.diagonal().mean().clamp(min=torch.finfo(torch.float64).tiny) * torch.eye(len(h), dtype=h.dtype)
    lam, q = torch.linalg.eigh(h)
    positive = lam[lam > 0]
    floor = positive.min() if positive.numel() else torch.tensor(1.0, dtype=h.dtype)
    lam = torch.where(lam > 0, lam, floor)
    root = lam.sqrt()
    return q * root, (q / root).T


@torch.no_grad()
def eora_factors(delta: Tensor, covariance: Tensor | None, rank: int, damp: float = DAMP) -> tuple[Tensor, Tensor]:
    """EoRA's ``(A [r, in], B [out, r])`` for the error ``delta [out, in]`` and input covariance ``covariance``
    (``None``: identity, i.e. the plain truncated SVD of ``delta``), in float64 (cast to ``delta``'s dtype)."""
    check_rank(rank, tuple(delta.shape), "the compressed layer")
    d = delta.detach().double()
    if covariance is None:
        f = truncate(dense_svd(d), rank, cut_at_numerical_rank=False)
        return f.down.to(delta.dtype), f.up.to(delta.dtype)
    project, back = _whitening(covariance, damp)
    f = truncate(dense_svd(d @ project), rank, cut_at_numerical_rank=False)
    return (f.down.double() @ back).to(delta.dtype), f.up.to(delta.dtype)


def weighted_error(error: Tensor, covariance: Tensor) -> float:
    """``√tr(E H Eᵀ)`` (``= ‖EXᵀ‖_F / √n`` for ``H = XᵀX / n``)."""
    e = error.double()
    return float(((e @ covariance.double()) * e).sum().clamp(min=0)) ** 0.5


def _relative(error: Tensor, weight: Tensor, h: Tensor) -> float:
    total = weighted_error(weight, h)
    return weighted_error(error, h) / total if total > 0 else 0.0


@torch.no_grad()
def eora(
    model: nn.Module,
    calibration: Iterable[Any] | None,
    *,
    compress: str | compressors.Compressor,
    rank: int,
    ratio: float | None = None,
    mode: str = "eigen",
    targets: list[str] | None = None,
    sequential: bool = True,
    name: str = "eora",
    tokenizer: Any = None,
    damp: float = DAMP,
    quantized: bool = False,
    progress: bool = True,
) -> Result:
    """Compress ``model``'s Linears **in place** and add EoRA's compensation as LoRA adapter ``name``.

    Args:
        model: a plain model (LLaMA-style decoder, or any model with ``targets``); its target weights are
            replaced by their compressed form (it becomes the compressed base).
        calibration: batches (``{"input_ids", "attention_mask"}`` or whatever ``model`` takes); needed for
            ``mode="eigen"`` and for the error report.
        compress: a compressor name (``"magnitude"`` with ``ratio``, ``"2:4"``, ``"hqq4"``, ``"hqq3"``) or a
            function ``W -> W_c``.
        rank: the compensation's rank ``r`` (at most ``min(out, in)`` of every target).
        mode: ``"eigen"`` (EoRA) or ``"svd"`` (plain truncated SVD of ``ΔW``, the paper's baseline).
        targets: Linear name suffixes (default: LLaMA's q, k, v, o, gate, up, down projections).
        sequential: feed each block the compensated outputs of the blocks before it (LLaMA layout only).
        tokenizer: checked against the model's vocabulary if given.
        quantized: with an ``"hqqK"`` compressor, store the compressed base quantised: every target becomes
            hqq's ``HQQLinear`` (packed codes; :mod:`peftkit.core.quant` adapts it) and ``W_c`` is what that layer
            computes (its dequantised weight); otherwise the base keeps dense, dequantised weights.
        progress: show a progress bar over the blocks.

    Raises:
        RatioError, RankError, CalibrationError, UnknownArchitectureError, CompressorError.
    """
    if mode not in MODES:
        raise CompressOptionError(f"mode must be one of {MODES}, got {mode!r}")
    fn = compressors.get(compress, ratio) if isinstance(compress, str) else compress
    bits = compressors.hqq_bits(compress) if isinstance(compress, str) else None
    if quantized and bits is None:
        raise CompressOptionError(f"quantized=True needs an hqq compressor ({', '.join(compressors.NAMES[2:])})")
    stored: dict[str, nn.Module] = {}
    layers = arch.linears(model, targets, "EoRA")
    for path, layer in layers.items():
        check_rank(rank, tuple(layer.weight.shape), path)
    data = check_calibration(model, calibration, tokenizer) if calibration is not None or mode == "eigen" else None
    model.eval()
    tensors: dict[str, Tensor] = {}
    report = Report({}, {})

    def compensate(group: dict[str, nn.Linear], stats: dict[str, Any] | None, original: dict[str, Tensor]) -> None:
        for path, layer in group.items():
            h = stats[path].second if stats is not None else None
            delta = original[path] - layer.weight.detach().float()
            a, b = eora_factors(delta, h if mode == "eigen" else None, rank, damp)
            tensors[f"{path}.A"], tensors[f"{path}.B"] = a.to(layer.weight.dtype), b.to(layer.weight.dtype)
            if h is not None:
                report.before[path] = _relative(delta, original[path], h)
                report.after[path] = _relative(delta - b.float() @ a.float(), original[path], h)

    def squeeze(group: dict[str, nn.Linear]) -> dict[str, Tensor]:
        original = {p: m.weight.detach().float().clone() for p, m in group.items()}
        for p, m in group.items():
            if quantized:  # W_c is what the stored quantised layer computes
                stored[p] = compressors.hqq_linear(m, int(bits))  # type: ignore[arg-type]
                m.weight.copy_(stored[p].dequantize().reshape(m.weight.shape).to(m.weight.dtype))
            else:
                m.weight.copy_(fn(m.weight.detach()).to(m.weight.dtype))
        return original

    blocks = _blocks(model, layers) if sequential else None
    if blocks is None:
        original = squeeze(layers)
        stats = module_statistics(model, layers, data, desc="EoRA calibration") if data is not None else None
        compensate(layers, stats, original)
    else:
        inputs = block_inputs(model, blocks[0][0], data) if data is not None else None
        for block, group in tqdm(blocks, desc="EoRA", unit="block", leave=False, disable=not progress):
            original = squeeze(group)
            stats = None
            if inputs is not None:
                with Recorder(group) as recorder:
                    replay(block, inputs, recorder)
                stats = recorder.stats
            compensate(group, stats, original)
            if inputs is not None:  # the next block sees this one compensated (W_c + BA), then W_c is put back
                compressed = {p: m.weight.detach().clone() for p, m in group.items()}
                for p, m in group.items():
                    m.weight.add_((tensors[f"{p}.B"] @ tensors[f"{p}.A"]).to(m.weight.dtype))
                inputs = replay(block, inputs)
                for p, m in group.items():
                    m.weight.copy_(compressed[p])
    for p, q in stored.items():
        arch.replace(model, p, q)
    adapted = AdaptedModel(model)
    config = LoRAConfig(r=rank, alpha=float(rank), targets=list(layers))
    adapted.load_tensors(name, config, tensors, activate=True, source="EoRA")
    return Result(adapted, report)


def _blocks(model: nn.Module, layers: dict[str, nn.Linear]) -> list[tuple[nn.Module, dict[str, nn.Linear]]] | None:
    """The decoder blocks with the targets inside each, when every target sits in a LLaMA-style block."""
    try:
        prefix, blocks = arch.decoder_blocks(model, "EoRA")
    except UnknownArchitectureError:
        return None
    out, seen = [], 0
    for i, block in enumerate(blocks):
        group = {p: m for p, m in layers.items() if p.startswith(f"{prefix}.{i}.")}
        seen += len(group)
        out.append((block, group))
    return out if seen == len(layers) else None
