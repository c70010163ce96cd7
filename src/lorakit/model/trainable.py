"""Which parameters train: the active adapters' LoRA weights, their modules_to_save copies and, by ``bias``,
the base biases. Everything else is frozen."""

from __future__ import annotations

import torch.nn as nn

from ..config import LoraConfig
from ..layers import LoraLayer
from .modules_to_save import ModulesToSaveWrapper


def mark_trainable(model: nn.Module, configs: dict[str, LoraConfig], active: list[str]) -> None:
    for param in model.parameters():
        param.requires_grad_(False)
    inference = all(configs[n].inference_mode for n in active if n in configs)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_adapter(active)
            if inference or module.disable_adapters:
                _freeze_adapters(module)
        elif isinstance(module, ModulesToSaveWrapper):
            module.set_adapter([n for n in active if n in module.modules_to_save], inference_mode=inference)
    if not inference:
        for name in active:
            _unfreeze_biases(model, configs[name].bias if name in configs else "none")


def _freeze_adapters(layer: LoraLayer) -> None:
    for name in layer.adapters:
        for param in layer.adapter_parameters(name):
            param.requires_grad_(False)


def _managed_elsewhere(model: nn.Module) -> set[int]:
    """Ids of parameters whose trainability LoRA layers (adapter weights) and modules_to_save wrappers (frozen
    original, per-adapter copies) decide; bias='all' must not unfreeze them."""
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            ids.update(id(p) for name in module.adapters for p in module.adapter_parameters(name))
        elif isinstance(module, ModulesToSaveWrapper):
            ids.update(id(p) for p in module.parameters())
    return ids


def _unfreeze_biases(model: nn.Module, bias: str) -> None:
    """bias='all': every base bias; 'lora_only': biases of the layers LoRA wraps."""
    if bias == "all":
        skip = _managed_elsewhere(model)
        for pname, param in model.named_parameters():
            if pname.rsplit(".", 1)[-1] == "bias" and id(param) not in skip:
                param.requires_grad_(True)
    elif bias == "lora_only":
        for module in model.modules():
            if isinstance(module, LoraLayer) and module.bias is not None:
                module.bias.requires_grad_(True)
