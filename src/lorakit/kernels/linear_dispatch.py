"""When a LoRA Linear may take the fused path, and the call into it.

``fused_forward`` covers the common case (one active plain adapter on a plain ``nn.Linear``): training, gradient
checkpointing (the node is deterministic given the RNG state, which checkpointing restores) and inference.
``fast_term`` is the adapter term alone in the activation dtype, for the cases the fused node does not cover.
Each returns None where it does not apply, and the layer then runs its reference path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..routing import current_routing
from .adapter_stack import cast_factors
from .eligibility import autocast_active, dropout_probability, global_hooks_present, plain_linear
from .lora_linear import fast_lora_term, fused_lora_linear
from .switch import fast_paths_enabled

if TYPE_CHECKING:
    from ..layers.linear import Linear


def _plain_factors(layer: Linear, name: str) -> bool:
    return plain_linear(layer.lora_A[name]) and plain_linear(layer.lora_B[name])


def _single_plain_adapter(layer: Linear) -> str | None:
    """The one active adapter when it is plain LoRA (no variant, no lora_bias) with plain factors, else None."""
    active = layer._active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    record = layer.adapters.get(name)
    if record is None or record.variant is not None or record.lora_bias or not _plain_factors(layer, name):
        return None
    return name


def fused_forward(layer: Linear, x: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """y = base(x) + s * B A dropout(x) through one fused node, or None when the reference path must run.

    Args:
        x: (..., in) in the base weight's dtype
    Returns:
        (..., out) or None
    """
    if not fast_paths_enabled() or args or kwargs or layer._disable_adapters or layer.merged_adapters:
        return None
    if current_routing() is not None or layer.fan_in_fan_out or global_hooks_present():
        return None
    if torch.compiler.is_compiling():
        return None  # compiled graphs take the reference path, which the compiler fuses itself
    base = layer.base_layer
    if not plain_linear(base) or x.dtype != base.weight.dtype or x.device != base.weight.device:
        return None
    if not x.dtype.is_floating_point or autocast_active(x.device):
        return None
    name = _single_plain_adapter(layer)
    if name is None:
        return None
    p = dropout_probability(layer.lora_dropout[name])
    if p is None:
        return None
    scaling = layer.adapters[name].scaling
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if lora_a.device != x.device:
        return None
    if p == 0.0 and not (torch.is_grad_enabled() and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad)):
        lora_a, lora_b = cast_factors(layer, name, x.dtype)  # inference: cached casts of the float32 masters
    return fused_lora_linear(x, base.weight, base.bias, lora_a, lora_b, scaling, p)


def fast_term(layer: Linear, name: str, x: torch.Tensor) -> torch.Tensor | None:
    """s * B A dropout(x) in x's dtype (plain autograd ops), or None when the reference ``_lora_term`` must run.

    Args:
        x: (..., in)
    Returns:
        (..., out) in x's dtype, or None
    """
    if not fast_paths_enabled() or not x.dtype.is_floating_point or autocast_active(x.device):
        return None
    record = layer.adapters[name]
    if record.lora_bias or not _plain_factors(layer, name) or global_hooks_present():
        return None
    dropout = layer.lora_dropout[name]
    if dropout_probability(dropout) is None:
        return None
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if lora_a.device != x.device:
        return None
    return fast_lora_term(x, lora_a, lora_b, record.scaling, dropout)
