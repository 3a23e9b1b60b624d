"""Hugging Face PEFT folders: export and import (the format only; the peft library is not needed)."""
