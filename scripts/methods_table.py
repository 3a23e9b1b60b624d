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
    return doc.strip().splitlines()[0] if doc.strip() else ""


def main() -> None:
    layers = sample_layers()
    print("# Registered methods\n")
    print("Generated from the registry by `make docs` (scripts/methods_table.py); do not edit by hand.\n")
    print("| method | config | layers | mergeable | identity at init | summary |")
    print("|---|---|---|---|---|---|")
    for name in pk.list_methods():
        cls = pk.get_method(name)
        kinds = ", ".join(k for k, m in layers.items() if cls.supports(m))
        mergeable = "no" if "mergeable" in cls.exempt else "yes"
        identity = "no" if "identity_at_init" in cls.exempt else "yes"
        print(f"| `{name}` | `{cls.config_class.__name__}` | {kinds} | {mergeable} | {identity} | {summary(cls)} |")


if __name__ == "__main__":
    main()
