"""get_peft_model: wrap a model with its first LoRA adapter."""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .config import LoraConfig
from .peft_model import PeftModel, peft_model_class


def get_peft_model(
    model: nn.Module,
    peft_config: LoraConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Inject adapter ``adapter_name`` into ``model`` and return the task-specific PeftModel.

    The model is modified in place (its targeted modules are replaced by LoRA layers).
    """
    if mixed:
        raise ValueError("mixed=True (PeftMixedModel) is not supported by lorakit; all adapters here are LoRA.")
    from .layers import LoraLayer

    if any(isinstance(module, LoraLayer) for module in model.modules()):  # PEFT's warning, same condition
        warnings.warn(
            "You are trying to modify a model with PEFT for a second time. If you want to reload the model with a "
            "different config, make sure to call `.unload()` before.",
            stacklevel=2,
        )
    from .model.peft_warnings import warn_get_peft_model_settings

    model_config = getattr(model, "config", None)
    warn_get_peft_model_settings(peft_config, revision, low_cpu_mem_usage)
    if peft_config.base_model_name_or_path is None:  # a name the caller set is kept (PEFT replaces it, warning)
        peft_config.base_model_name_or_path = getattr(model_config, "name_or_path", None) or None
    if revision is not None:
        peft_config.revision = revision
    cls = peft_model_class(peft_config)
    return cls(
        model,
        peft_config,
        adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )


def inject_adapter_in_model(
    peft_config: LoraConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Add LoRA layers (and modules_to_save copies) to ``model`` in place without a PeftModel wrapper; only the
    adapter's parameters stay trainable, as with get_peft_model. Returns ``model``.

    With ``state_dict``, the modules to adapt are the ones its ``lora_*`` keys name (the values are not loaded; see
    ``lorakit.model.state_dict_targets``)."""
    from .model.inject import inject_lora, wrap_modules_to_save
    from .model.peft_warnings import warn_existing_peft_config
    from .model.trainable import mark_trainable
    from .model.weight_tying import plan_weight_tying, tie_lora_factors, tie_saved_copies

    warn_existing_peft_config(model)
    targeting = peft_config
    if state_dict is not None:
        from .model.state_dict_targets import config_for_state_dict

        targeting = config_for_state_dict(peft_config, model, state_dict)
    tying = plan_weight_tying(model, targeting)
    inject_lora(model, targeting, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    wrap_modules_to_save(model, list(targeting.modules_to_save or []), adapter_name)
    tie_saved_copies(model, tying, adapter_name)
    if tying.lora:
        tie_lora_factors(model, tying, adapter_name, targeting, low_cpu_mem_usage=low_cpu_mem_usage)
    mark_trainable(model, {adapter_name: peft_config}, [adapter_name])
    return model
