"""Former home of the PEFT export/import (now :mod:`peftkit.interop.convert`, :mod:`~peftkit.interop.formats`
and :mod:`~peftkit.interop.folder`); kept so ``from peftkit.interop.peft_format import export_peft`` works."""

from peftkit.interop.convert import export_peft, import_peft
from peftkit.interop.folder import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE
from peftkit.interop.formats import PEFT_FORMATS, PeftFormat

__all__ = ["PEFT_CONFIG_FILE", "PEFT_FORMATS", "PEFT_WEIGHTS_FILE", "PeftFormat", "export_peft", "import_peft"]
