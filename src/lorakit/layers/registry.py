"""Which LoRA layer type wraps which module: an ordered table, first match wins, extensible by users.

An entry is ``(name, matches(module, config) -> bool, build(module, config) -> LoraLayer)``.
``register_layer_type`` puts custom entries in front of the built-in ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch.nn as nn

from ..config import LoraConfig
from .base import LoraLayer
from .bnb import Linear4bit, Linear8bitLt, is_bnb_4bit, is_bnb_8bit
from .conv import Conv
from .embedding import Embedding
from .linear import Linear
from .mha import MultiheadAttention


@dataclass
class LayerType:
    name: str
    matches: Callable[[nn.Module, LoraConfig], bool]
    build: Callable[[nn.Module, LoraConfig], LoraLayer]


def _is_conv1d_transformers(module: nn.Module, _config: LoraConfig) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _build_linear(module: nn.Module, config: LoraConfig, layer_cls: type[Linear] = Linear) -> LoraLayer:
    if config.fan_in_fan_out:
        warnings.warn(
            f"fan_in_fan_out=True does not apply to {type(module).__name__} (weight stored (out, in)); setting it "
            "to False.",
            stacklevel=5,
        )
        config.fan_in_fan_out = False  # written back into the config, as PEFT does
    return layer_cls(module, fan_in_fan_out=False)


def _build_conv1d_transformers(module: nn.Module, config: LoraConfig) -> LoraLayer:
    if not config.fan_in_fan_out:
        warnings.warn(
            "fan_in_fan_out=False but the target is transformers' Conv1D (weight stored (in, out)); setting it to "
            "True.",
            stacklevel=5,
        )
        config.fan_in_fan_out = True  # written back into the config, as PEFT does
    return Linear(module, fan_in_fan_out=True)


LAYER_TYPES: list[LayerType] = [
    # bitsandbytes' layers subclass nn.Linear, so they come first; recognised without importing bitsandbytes
    LayerType("bnb_8bit", is_bnb_8bit, partial(_build_linear, layer_cls=Linear8bitLt)),
    LayerType("bnb_4bit", is_bnb_4bit, partial(_build_linear, layer_cls=Linear4bit)),
    LayerType("embedding", lambda m, c: isinstance(m, nn.Embedding), lambda m, c: Embedding(m)),
    LayerType("conv", lambda m, c: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)), lambda m, c: Conv(m)),
    LayerType(
        "multihead_attention",
        lambda m, c: isinstance(m, nn.MultiheadAttention),
        lambda m, c: MultiheadAttention(m),
    ),
    LayerType("linear", lambda m, c: isinstance(m, nn.Linear), _build_linear),
    LayerType("conv1d_transformers", _is_conv1d_transformers, _build_conv1d_transformers),
]


def register_layer_type(
    name: str,
    matches: Callable[[nn.Module, LoraConfig], bool],
    build: Callable[[nn.Module, LoraConfig], LoraLayer],
) -> None:
    """Add a layer type ahead of the built-in ones (first match wins)."""
    LAYER_TYPES.insert(0, LayerType(name, matches, build))


def create_lora_layer(module: nn.Module, config: LoraConfig, module_name: str) -> LoraLayer:
    """Wrap ``module`` with the first matching LoRA layer type; ValueError naming the supported types otherwise."""
    for entry in LAYER_TYPES:
        if entry.matches(module, config):
            return entry.build(module, config)
    raise ValueError(
        f"Target module {module_name!r} of type {type(module).__name__} is not supported. LoRA supports: "
        f"{', '.join(e.name for e in LAYER_TYPES)} (bitsandbytes Linear8bitLt/Linear4bit, torch.nn.Linear, Embedding, "
        "Conv1d/2d/3d, MultiheadAttention, transformers Conv1D); "
        "register others with lorakit.layers.register_layer_type."
    )
