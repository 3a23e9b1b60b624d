"""Print the methods table (Markdown) from the registry: `make docs` writes it to docs/methods.md."""

from __future__ import annotations

import sys

from peftkit.core.registry import describe_methods


def table() -> str:
    lines = [
        "# Registered methods\n",
        "Generated from the registry by `make docs` (scripts/methods_table.py); do not edit by hand.\n",
        "| method | config | layers | mergeable | identity at init | summary |",
        "|---|---|---|---|---|---|",
    ]
    yes = {True: "yes", False: "no"}
    for m in describe_methods():
        lines.append(
            f"| `{m.name}` | `{m.config}` | {', '.join(m.layers)} | {yes[m.mergeable]} | {yes[m.identity_at_init]} "
            f"| {m.summary} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table())
