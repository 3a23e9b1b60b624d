"""The exceptions users catch: ``from peftkit.errors import BaseModelMismatch``."""

from peftkit.core.errors import *  # noqa: F403
from peftkit.core.errors import __all__  # noqa: F401
