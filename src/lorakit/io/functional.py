"""PEFT's functional state-dict API: adapter tensors out of a model and back in, keyed as on disk."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import LoraConfig
from .checkpoint import LoadResult, load_adapter_weights


def _config(model: nn.Module, adapter_name: str) -> LoraConfig:
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict):
        if adapter_name not in configs:
            raise ValueError(f"Adapter {adapter_name!r} not found; existing adapters: {sorted(configs)}.")
        return configs[adapter_name]
    return LoraConfig()  # a model injected in place keeps no config: LoRA tensors and modules_to_save only


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` writes for ``adapter_name``, keyed without the adapter name.

    Args:
        model: a PeftModel, or a model with adapters injected in place.
        state_dict: values to use instead of ``model.state_dict()`` (same keys).
        unwrap_compiled: look through ``torch.compile``'s wrapper (``_orig_mod``).
    """
    from .state_dict import adapter_state_dict

    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    from .shape_check import warn_malformed_lora

    tensors = adapter_state_dict(model, adapter_name, _config(model, adapter_name), save_embedding_layers, state_dict)
    warn_malformed_lora(tensors, adapter_name)
    return tensors


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> LoadResult:
    """Load disk-format adapter tensors into the existing adapter ``adapter_name`` (the name on disk does not matter).

    Raises, without changing the model, when a tensor's shape differs (unless ``ignore_mismatched_sizes``) or a
    tensor has no place in the model. ``low_cpu_mem_usage`` is accepted for PEFT compatibility: adapters created on
    the meta device are always filled by assignment."""
    del low_cpu_mem_usage
    return load_adapter_weights(
        model, peft_model_state_dict, adapter_name, "state dict", ignore_mismatched_sizes=ignore_mismatched_sizes
    )
