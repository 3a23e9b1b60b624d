"""Hugging Face PEFT folders: export and import (the format only; the peft library is not needed), and the
truncated-SVD conversion of a mergeable adapter to a low-rank (LoRA) form.

* :mod:`~peftkit.interop.formats`: the table, one :class:`PeftFormat` entry per method;
* :mod:`~peftkit.interop.configs`: PEFT's ``adapter_config.json`` <-> peftkit configs, by an entry;
* :mod:`~peftkit.interop.folder`: reading and writing PEFT folders;
* :mod:`~peftkit.interop.convert`: :func:`export_peft` / :func:`import_peft`, one flow each over the table;
* :mod:`~peftkit.interop.svd`: :func:`svd_lowrank` (per module; the serving engine's ``svd_rank``) and
  :func:`svd_to_lora` (a whole adapter as a LoRA, e.g. to export it to PEFT).
"""

from peftkit.interop.convert import export_peft, import_peft
from peftkit.interop.folder import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE
from peftkit.interop.formats import PEFT_FORMATS, PeftFormat
from peftkit.interop.svd import SVDLowRank, svd_lowrank, svd_to_lora

__all__ = [
    "PEFT_CONFIG_FILE",
    "PEFT_FORMATS",
    "PEFT_WEIGHTS_FILE",
    "PeftFormat",
    "SVDLowRank",
    "export_peft",
    "import_peft",
    "svd_lowrank",
    "svd_to_lora",
]
