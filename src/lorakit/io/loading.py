"""PeftModel.from_pretrained and load_adapter: read a saved adapter (folder or Hub id) into a model."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from ..config import LoraConfig
from ..model.lora_model import restore_on_error
from .checkpoint import HUB_KWARGS, LoadResult, load_adapter_weights, read_adapter_weights

if TYPE_CHECKING:
    from ..peft_model import PeftModel


def _split_hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KWARGS}


def _read_config(model_id: str | os.PathLike, config: LoraConfig | None, hub: dict[str, Any]) -> LoraConfig:
    if config is not None:
        return config
    return LoraConfig.from_pretrained(model_id, **hub)


def _apply_runtime(config: LoraConfig, is_trainable: bool, ephemeral_gpu_offload: bool) -> None:
    config.inference_mode = not is_trainable
    if ephemeral_gpu_offload:
        config.runtime_config.ephemeral_gpu_offload = True


def _place_loaded(peft_model: PeftModel, adapter_name: str, autocast_adapter_dtype: bool) -> None:
    """Give the loaded adapter its layers' device and the dtype an ordinary load gives. Needed where the load
    assigned the checkpoint's tensors (meta parameters, e.g. low_cpu_mem_usage): they keep the file's dtype and
    ``torch_device`` otherwise. A no-op after an in-place copy."""
    for _, layer in peft_model.base_model.lora_layers():
        if adapter_name in layer.adapters:
            layer._move_adapter(adapter_name, autocast_adapter_dtype)


def load_peft_model(
    cls: type[PeftModel],
    model: nn.Module,
    model_id: str | os.PathLike,
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
    config: LoraConfig | None = None,
    autocast_adapter_dtype: bool = True,
    ephemeral_gpu_offload: bool = False,
    low_cpu_mem_usage: bool = False,
    **kwargs: Any,
) -> PeftModel:
    from ..peft_model import PeftModel, peft_model_class

    hub = _split_hub_kwargs(kwargs)
    torch_device = kwargs.pop("torch_device", None)
    ignore_mismatched_sizes = bool(kwargs.pop("ignore_mismatched_sizes", False))
    if kwargs:
        raise TypeError(f"Unexpected keyword arguments for from_pretrained: {sorted(kwargs)}.")
    config = _read_config(model_id, config, hub)
    _apply_runtime(config, is_trainable, ephemeral_gpu_offload)
    tensors = read_adapter_weights(model_id, device=torch_device or "cpu", **hub)
    target_cls = peft_model_class(config) if cls is PeftModel else cls
    with restore_on_error(model):  # a failed load leaves the user's model as it was given
        peft_model = target_cls(
            model,
            config,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )
        load_adapter_weights(peft_model, tensors, adapter_name, str(model_id), ignore_mismatched_sizes)
        _place_loaded(peft_model, adapter_name, autocast_adapter_dtype)
    peft_model.base_model._apply_trainability()
    if not is_trainable:
        peft_model.eval()
    return peft_model


def load_adapter_into(
    peft_model: PeftModel,
    model_id: str | os.PathLike,
    adapter_name: str,
    *,
    is_trainable: bool = False,
    torch_device: str | None = None,
    autocast_adapter_dtype: bool = True,
    ephemeral_gpu_offload: bool = False,
    low_cpu_mem_usage: bool = False,
    **kwargs: Any,
) -> LoadResult:
    hub = _split_hub_kwargs(kwargs)
    config = _read_config(model_id, kwargs.pop("config", None), hub)
    ignore_mismatched_sizes = bool(kwargs.pop("ignore_mismatched_sizes", False))
    if kwargs:
        raise TypeError(f"Unexpected keyword arguments for load_adapter: {sorted(kwargs)}.")
    if adapter_name in peft_model.peft_config:
        raise ValueError(
            f"Adapter name {adapter_name!r} already exists; existing adapters: {sorted(peft_model.peft_config)}."
        )
    _apply_runtime(config, is_trainable, ephemeral_gpu_offload)
    tensors = read_adapter_weights(model_id, device=torch_device or "cpu", **hub)
    was_training = peft_model.training
    with peft_model.base_model.adding(adapter_name):  # all or nothing
        peft_model.add_adapter(
            adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage, autocast_adapter_dtype=autocast_adapter_dtype
        )
        result = load_adapter_weights(peft_model, tensors, adapter_name, str(model_id), ignore_mismatched_sizes)
        _place_loaded(peft_model, adapter_name, autocast_adapter_dtype)
    peft_model.base_model._apply_trainability()
    if not is_trainable:
        peft_model.eval()
    elif was_training:
        peft_model.train()
    return result
