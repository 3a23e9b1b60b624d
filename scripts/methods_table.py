"""Print the methods table (Markdown) from the registry: `make docs` writes it to docs/methods.md."""

from __future__ import annotations

import sys

from torch import nn

import peftkit as pk


def sample_layers() -> dict[str, nn.Module]:
    layers: dict[str, nn.Module] = {
        "Linear": nn.Linear(8, 8),
        "Conv2d": nn.Conv2d(4, 4, 3),
        "Embedding": nn.Embedding(10, 8),
    }
    try:
        from transformers.pytorch_utils import Conv1D

        layers["GPT-2 Conv1D"] = Conv1D(8, 8)
    except ImportError:
        pass
    return layers


def summary(cls: type) -> str:
    doc = sys.modules[cls.__module__].__doc__ or cls.__doc__ or ""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    return paragraph if len(paragraph) <= 140 else paragraph[:139].rstrip() + "…"


def table() -> str:
    layers = sample_layers()
    lines = [
        "# Registered methods\n",
        "Generated from the registry by `make docs` (scripts/methods_table.py); do not edit by hand.\n",
        "| method | config | layers | mergeable | identity at init | summary |",
        "|---|---|---|---|---|---|",
    ]
    for name in pk.list_methods():
        cls = pk.get_method(name)
        kinds = ", ".join(k for k, m in layers.items() if cls.supports(m))
        mergeable = "no" if "mergeable" in cls.exempt else "yes"
        identity = "no" if "identity_at_init" in cls.exempt else "yes"
        lines.append(
            f"| `{name}` | `{cls.config_class.__name__}` | {kinds} | {mergeable} | {identity} | {summary(cls)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table())
