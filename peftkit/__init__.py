"""peftkit: parameter-efficient fine-tuning, from adapter methods to multi-adapter serving.

import peftkit as pk
model = pk.adapt(base_model, pk.LoRAConfig(r=8, alpha=16, targets=["query", "value"]))
"""

from peftkit import assets, diagnostics, errors, init
from peftkit.core.config import AdapterConfig
from peftkit.core.dense import FullConfig
from peftkit.core.model import AdaptedModel, TrainableReport, adapt, load
from peftkit.core.protocol import Adapter, LowRank
from peftkit.core.registry import get_config, get_method, list_methods, register
from peftkit.core.version import __version__
from peftkit.interop import export_peft, import_peft
from peftkit.merge import merge_adapters
from peftkit.methods.dora import DoRAConfig
from peftkit.methods.lora import LoRAConfig

__all__ = [
    "AdaptedModel",
    "Adapter",
    "AdapterConfig",
    "DoRAConfig",
    "FullConfig",
    "LoRAConfig",
    "LowRank",
    "TrainableReport",
    "__version__",
    "adapt",
    "assets",
    "diagnostics",
    "errors",
    "export_peft",
    "get_config",
    "get_method",
    "import_peft",
    "init",
    "list_methods",
    "load",
    "merge_adapters",
    "register",
]
