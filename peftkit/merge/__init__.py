"""Merging adapters in weight space, and what builds on it.

* :mod:`~peftkit.merge.merge`: :func:`merge_adapters` (``pk.merge_adapters``): task arithmetic, TIES, DARE,
  magnitude pruning and KnOTS on the adapters' dense updates, returned as an exact (or SVD-truncated) LoRA;
* :mod:`~peftkit.merge.combine`: the element-wise merges of stacked task tensors;
* :mod:`~peftkit.merge.knots`: KnOTS' shared-basis alignment;
* :mod:`~peftkit.lowrank`: exact / truncated low-rank forms (float64 SVD);
* :mod:`~peftkit.merge.sources`: reading and checking the adapters to merge;
* :mod:`~peftkit.merge.rmm`: reversible merging (a shared basis and per-task coefficients);
* :mod:`~peftkit.merge.lorahub`: LoraHub, gradient-free search of the merge weights (:mod:`~peftkit.merge.cma`);
* :mod:`~peftkit.merge.sglora`: SG-LoRA, a CVAE generating LoRA parameters from a task description's embedding;
* :mod:`~peftkit.merge.translora`: Trans-LoRA, moving an adapter to another base by distillation on filtered
  synthetic inputs;
* :mod:`~peftkit.merge.runs`: merging training runs' adapters into a run folder (``peftkit merge-adapters``);
* :mod:`~peftkit.merge.errors`: the errors of bad merge requests;
* :mod:`~peftkit.merge.composition`: inference-time composition in diffusion sampling (LoRA Merge / Switch /
  Composite); :mod:`~peftkit.merge.cmlora`: CMLoRA (frequency order, dominant LoRA, cached deep features);
  :mod:`~peftkit.merge.autolora`: AutoLoRA (weight-probe retrieval, per-layer per-timestep gated fusion).
"""

from peftkit.merge.autolora import GatedFusion, LoRARetriever
from peftkit.merge.cmlora import cmlora
from peftkit.merge.composition import Guidance, lora_composite, lora_merge, lora_switch
from peftkit.merge.errors import MergeError, MergeOptionError, MergeWeightsError, TargetMismatchError
from peftkit.merge.lorahub import LoraHubResult, lorahub
from peftkit.merge.merge import METHODS, MergeResult, merge_adapters
from peftkit.merge.rmm import ReversibleMerge, rmm, rmm_report
from peftkit.merge.sglora import SGLoRA, fit_sglora
from peftkit.merge.translora import fit_discriminator, synthesize, trans_lora

__all__ = [
    "METHODS",
    "GatedFusion",
    "Guidance",
    "LoRARetriever",
    "LoraHubResult",
    "MergeError",
    "MergeOptionError",
    "MergeResult",
    "MergeWeightsError",
    "ReversibleMerge",
    "SGLoRA",
    "TargetMismatchError",
    "cmlora",
    "fit_discriminator",
    "fit_sglora",
    "lora_composite",
    "lora_merge",
    "lora_switch",
    "lorahub",
    "merge_adapters",
    "rmm",
    "rmm_report",
    "synthesize",
    "trans_lora",
]
