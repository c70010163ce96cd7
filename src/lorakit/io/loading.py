"""PeftModel.from_pretrained and load_adapter: read a saved adapter (folder or Hub id) into a model."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from ..config import LoraConfig
from ..model.lora_model import restore_on_error
from ..model.peft_warnings import warn_base_changing_with_others
from .checkpoint import HUB_KWARGS, LoadResult, load_adapter_weights, read_adapter
from .dispatch import check_dispatch, pop_dispatch_kwargs

if TYPE_CHECKING:
    from ..peft_model import PeftModel


def _split_hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs.pop(k) for k in list(kwargs) if k in HUB_KWARGS}


def _read_config(model_id: str | os.PathLike, config: LoraConfig | None, hub: dict[str, Any]) -> LoraConfig:
    if config is not None:
        return config
    config = LoraConfig.from_pretrained(model_id, **hub)
    LoraConfig._get_peft_type(model_id, **hub)  # a config without peft_type is refused, as PEFT does
    return config


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
    check_dispatch(model, pop_dispatch_kwargs(kwargs))
    if kwargs:
        raise TypeError(f"Unexpected keyword arguments for from_pretrained: {sorted(kwargs)}.")
    given = config
    config, tensors = read_adapter(
        model_id, lambda: _read_config(model_id, given, hub), given is not None, torch_device or "cpu", hub
    )
    _apply_runtime(config, is_trainable, ephemeral_gpu_offload)
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
    given = kwargs.pop("config", None)
    ignore_mismatched_sizes = bool(kwargs.pop("ignore_mismatched_sizes", False))
    check_dispatch(peft_model.get_base_model(), pop_dispatch_kwargs(kwargs))
    if kwargs:
        raise TypeError(f"Unexpected keyword arguments for load_adapter: {sorted(kwargs)}.")
    if adapter_name in peft_model.peft_config:
        raise ValueError(
            f"Adapter name {adapter_name!r} already exists; existing adapters: {sorted(peft_model.peft_config)}."
        )
    config, tensors = read_adapter(
        model_id, lambda: _read_config(model_id, given, hub), given is not None, torch_device or "cpu", hub
    )
    _apply_runtime(config, is_trainable, ephemeral_gpu_offload)
    warn_base_changing_with_others([config, *peft_model.peft_config.values()])
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
