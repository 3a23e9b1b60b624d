"""Every method file registers itself on import; this package imports them all."""

from . import dora, full, lora

__all__ = ["dora", "full", "lora"]
