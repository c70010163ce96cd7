"""When a LoRA Linear may take the fused path, and the call into it.

``fused_forward`` covers the common case (one active plain adapter on a plain ``nn.Linear``): training, gradient
checkpointing (the node is deterministic given the RNG state, which checkpointing restores) and inference.
``fast_term`` is the adapter term alone in the activation dtype, for the cases the fused node does not cover.
Each returns None where it does not apply, and the layer then runs its reference path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn as nn

from ..routing import current_routing
from .adapter_stack import cast_factors
from .eligibility import (
    autocast_active,
    autocast_keeps_dtype,
    dropout_probability,
    global_hooks_present,
    plain_conv1d,
    plain_linear,
)
from .lora_linear import fast_lora_term, fused_call
from .shared_inputs import kept_output, shared_forward
from .switch import fast_paths_enabled

if TYPE_CHECKING:
    from ..layers.linear import Linear
    from ..layers.record import AdapterRecord


# The checks below run for every LoRA Linear on every call, so they read modules and parameters straight from
# ``_modules`` / ``_parameters``: ``nn.Module.__getattr__`` (twice, through ``LoraLayer.__getattr__``) costs about a
# microsecond per lookup, which on a GPU step with a hundred LoRA layers is host time the device waits for.


def _submodule(module: nn.Module, name: str) -> nn.Module:
    return module.__dict__["_modules"][name]


def _plain_factors(layer: Linear, name: str) -> tuple[nn.Linear, nn.Linear] | None:
    """Adapter ``name``'s (lora_A, lora_B) modules when both are plain ``nn.Linear`` without hooks, else None."""
    modules = layer.__dict__["_modules"]
    lora_a = modules["lora_A"]._modules.get(name)
    lora_b = modules["lora_B"]._modules.get(name)
    if lora_a is None or lora_b is None or not (plain_linear(lora_a) and plain_linear(lora_b)):
        return None
    return lora_a, lora_b


def _single_plain_adapter(layer: Linear) -> tuple[str, AdapterRecord, nn.Linear, nn.Linear] | None:
    """The one active adapter when it is plain LoRA or a variant with its own fused node (``fused_linear``, e.g.
    DoRA), without lora_bias and with plain factors; else None."""
    active = layer._active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    record = layer.adapters.get(name)
    if record is None or record.lora_bias:
        return None
    if record.variant is not None and getattr(record.variant, "fused_linear", None) is None:
        return None
    factors = _plain_factors(layer, name)
    return None if factors is None else (name, record, *factors)


def call_allows_fast_path(layer: Linear) -> bool:
    """The per-call conditions every fused Linear path shares (plain and quantised bases): fast paths on, adapters
    enabled and unmerged, no mixed-batch routing, no global module hooks, not inside torch.compile (compiled graphs
    take the reference path, which the compiler fuses itself)."""
    if not fast_paths_enabled() or layer._disable_adapters or layer.merged_adapters:
        return False
    return current_routing() is None and not global_hooks_present() and not torch.compiler.is_compiling()


def active_factors(
    layer: Linear, x: torch.Tensor
) -> tuple[str, AdapterRecord, float, torch.Tensor, torch.Tensor] | None:
    """(name, record, dropout probability, A (r, in), B (out, r)) of the single active adapter a fused node can run
    on ``x``'s device (``_single_plain_adapter``, a known dropout), else None."""
    found = _single_plain_adapter(layer)
    if found is None:
        return None
    name, record, a_module, b_module = found
    p = dropout_probability(_submodule(layer, "lora_dropout")._modules[name])
    if p is None:
        return None
    lora_a, lora_b = a_module.__dict__["_parameters"]["weight"], b_module.__dict__["_parameters"]["weight"]
    return None if lora_a.device != x.device else (name, record, p, lora_a, lora_b)


def _base_weight(layer: Linear, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight as (out, in), bias) of a base the fused node can compute: a plain nn.Linear, or transformers' Conv1D
    (GPT-2; its (in, out) weight as a transposed view, no copy); else None."""
    params = base.__dict__["_parameters"]
    if not layer.fan_in_fan_out:
        return (params["weight"], params["bias"]) if plain_linear(base) else None
    return (params["weight"].t(), params["bias"]) if plain_conv1d(base) else None


class FusedPlan(NamedTuple):
    """What the fused node needs for one layer and input: the active adapter's ``name`` and ``record``, the base
    ``weight`` (out, in) and ``bias``, the factors ``lora_a`` (r, in) and ``lora_b`` (out, r), the dropout ``p``, and
    ``graph``: an autograd node is needed (dropout, or gradients for x or a parameter); else plain inference ops."""

    name: str
    record: AdapterRecord
    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    p: float
    graph: bool


def fused_plan(layer: Linear, x: torch.Tensor) -> FusedPlan | None:
    """``layer``'s ``FusedPlan`` on ``x``, or None when the reference path must run (the module docstring lists
    the conditions)."""
    if not call_allows_fast_path(layer):
        return None
    base_params = _base_weight(layer, _submodule(layer, "base_layer"))
    if base_params is None:
        return None
    weight, bias = base_params
    if x.dtype != weight.dtype or not x.dtype.is_floating_point or x.device != weight.device:
        return None
    if autocast_active(x.device) and not autocast_keeps_dtype(x):
        return None  # autocast would cast x or W: the reference path, under autocast
    factors = active_factors(layer, x)
    if factors is None:
        return None
    name, record, p, lora_a, lora_b = factors
    graph = p > 0.0 or (
        torch.is_grad_enabled()
        and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad or weight.requires_grad)
    )
    return FusedPlan(name, record, weight, bias, lora_a, lora_b, p, graph)


def fused_forward(layer: Linear, x: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """y = base(x) + s * B A dropout(x) through one fused node (shared with the layers that read the same x,
    ``shared_inputs``), or None when the reference path must run.

    Args:
        x: (..., in) in the base weight's dtype
    Returns:
        (..., out) or None
    """
    if args or kwargs:
        return None
    kept = kept_output(layer, x)  # computed by the first layer of its shared-input group, which checked this one
    if kept is not None:
        return kept
    plan = fused_plan(layer, x)
    if plan is None:
        return None
    if not autocast_active(x.device):
        return _fused_run(layer, x, plan)
    # x and W already in autocast's dtype: the nodes run as they do without it. Switched off and on directly
    # (0.4 us per layer) rather than through a nested ``torch.autocast(enabled=False)`` (2 us)
    device = x.device.type
    torch.set_autocast_enabled(device, False)
    try:
        return _fused_run(layer, x, plan)
    finally:
        torch.set_autocast_enabled(device, True)


def _fused_run(layer: Linear, x: torch.Tensor, plan: FusedPlan) -> torch.Tensor | None:
    """``fused_forward`` once ``plan`` is known: the variant's node, the shared-input group, or the fused node."""
    name, record, weight, bias, lora_a, lora_b, p, graph = plan
    if record.variant is not None:  # the variant's own node decides (None: its reference path); nn.Linear only
        return (
            None
            if layer.fan_in_fan_out
            else record.variant.fused_linear(layer, name, x, weight, bias, lora_a, lora_b, p)
        )
    if p == 0.0:
        shared = shared_forward(layer, x, plan, fused_plan)
        if shared is not None:
            return shared
    if not graph:
        lora_a, lora_b = cast_factors(layer, name, x.dtype)  # inference: cached casts of the float32 masters
    return fused_call(x, weight, bias, lora_a, lora_b, record.scaling, p, graph)


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
    if record.lora_bias or global_hooks_present():
        return None
    factors = _plain_factors(layer, name)
    dropout = _submodule(layer, "lora_dropout")._modules[name]
    if factors is None or dropout_probability(dropout) is None:
        return None
    lora_a, lora_b = factors[0].__dict__["_parameters"]["weight"], factors[1].__dict__["_parameters"]["weight"]
    if lora_a.device != x.device:
        return None
    return fast_lora_term(x, lora_a, lora_b, record.scaling, dropout)
