"""The package version (here, so that the core needs nothing from the package face)."""

__version__ = "0.1.0"
