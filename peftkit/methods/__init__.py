"""Every module in this package is a method file that registers itself on import; all are imported here,
so adding a method is adding a file."""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
