"""PEFT's names on :class:`~peftkit.core.model.AdaptedModel`, with PEFT's meaning: the calls people type by habit
(``merge_and_unload``, ``save_pretrained``, ``disable_adapter()``, ...) map onto peftkit's own, and attribute names
that have no peftkit counterpart get a hint in the ``AttributeError`` instead of a bare failure."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from .model import AdaptedModel

# PEFT attribute names people type by habit that have no same-named peftkit attribute: what to use instead.
PEFT_ATTRIBUTES = {
    "peft_config": "peftkit keeps each adapter's config in model.configs (name -> AdapterConfig)",
    "active_peft_config": "use model.configs[name]",
    "peft_type": "each config's method is type(model.configs[name]).method",
    "disable_adapter_layers": "use model.disable_adapters()",
    "enable_adapter_layers": "use model.enable_adapters()",
    "get_peft_config_as_dict": "use model.configs[name].to_dict()",
    "base_model_torch_dtype": "read a parameter's dtype of model.get_base_model()",
}


class PeftNames:
    """PEFT's method names, each a thin call to the peftkit method named in its docstring (a base class of
    :class:`~peftkit.core.model.AdaptedModel`)."""

    def disable_adapter(self: AdaptedModel) -> contextlib.AbstractContextManager[None]:
        """PEFT's ``with model.disable_adapter(): ...``: :meth:`adapters_disabled`."""
        return self.adapters_disabled()

    @property
    def active_adapter(self: AdaptedModel) -> str | list[str]:
        """PEFT's ``active_adapter``: the active adapter's name (a list when several are active)."""
        active = self.active_adapters
        return active[0] if len(active) == 1 else active

    def merge_and_unload(
        self: AdaptedModel, progressbar: bool = False, safe_merge: bool = False, adapter_names: Any = None
    ) -> nn.Module:
        """PEFT's ``merge_and_unload``: :meth:`merge` with ``unload=True`` (the active adapters, or
        ``adapter_names``). Merges are always checked: ``safe_merge`` and ``progressbar`` change nothing."""
        return self.merge(adapter_names, unload=True)

    def merge_adapter(self: AdaptedModel, adapter_names: Any = None) -> None:
        """PEFT's ``merge_adapter``: :meth:`merge` in place (``unload=False``)."""
        self.merge(adapter_names, unload=False)

    def unmerge_adapter(self: AdaptedModel) -> None:
        """PEFT's ``unmerge_adapter``: :meth:`unmerge`."""
        self.unmerge()

    def save_pretrained(
        self: AdaptedModel,
        save_directory: str | Path,
        selected_adapters: Sequence[str] | None = None,
        *,
        is_main_process: bool = True,
        safe_serialization: bool = True,
        **kwargs: Any,
    ) -> None:
        """PEFT's ``save_pretrained``: saves the adapters (not the base model) with :meth:`save`, in peftkit's
        format (read back by :func:`peftkit.load` / :meth:`from_pretrained`; :func:`peftkit.export_peft` writes a
        folder PEFT reads). Adapters are always safetensors, never pickle.

        Raises:
            TypeError: an option that would change what is written (``push_to_hub``, ``state_dict``, ...).
        """
        if kwargs:
            raise TypeError(
                f"save_pretrained() does not take {sorted(kwargs)}: it saves the adapters' own tensors only "
                "(model.save(dir) is the same call)"
            )
        if not safe_serialization:
            raise TypeError("peftkit writes safetensors only (safe_serialization=False would be pickle)")
        if is_main_process:
            self.save(save_directory, None if selected_adapters is None else list(selected_adapters))

    def push_to_hub(self: AdaptedModel, *args: Any, **kwargs: Any) -> None:
        """Refused: the wrapped model's ``push_to_hub`` would upload the whole base model with wrapper keys."""
        raise NotImplementedError(
            "peftkit does not upload models: save the adapters with model.save(dir) (or pk.export_peft(model, dir) "
            "for a PEFT folder) and upload that folder with huggingface_hub's upload_folder"
        )

    def get_nb_trainable_parameters(self: AdaptedModel) -> tuple[int, int]:
        """PEFT's ``(trainable, total)`` parameter counts (see :meth:`trainable_parameters`)."""
        report = self.trainable_parameters()
        return report.trainable, report.total
