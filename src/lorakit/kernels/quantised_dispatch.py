"""When a LoRA layer over a quantised base may take the quantised fused node (``quantised_linear``), and the call.

The layer type knows its base (bitsandbytes' 4-bit or 8-bit linear) and answers ``quantised_base(x)``: a
``QuantisedBase`` when its base can be computed that way for this x (frozen, no hooks, the standard weight layout),
else None. Everything else is checked here as ``linear_dispatch.fused_plan`` checks it for plain Linears: fast paths
on, one active plain adapter without lora_bias, a dropout the node knows, no routing, hooks, compilation or autocast,
factors on x's device. Layers that read the same x share one node (``shared_inputs``), as plain Linears do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from .adapter_stack import cast_factors
from .eligibility import autocast_active
from .linear_dispatch import active_factors, call_allows_fast_path
from .quantised_linear import QuantisedBase, quantised_lora, quantised_lora_inference
from .shared_inputs import kept_output, shared_forward

if TYPE_CHECKING:
    from ..layers.linear import Linear
    from ..layers.record import AdapterRecord


class QuantisedPlan(NamedTuple):
    """What the node needs for one layer and input (fields named as ``FusedPlan``'s, which ``shared_inputs`` reads):
    the active adapter's ``name`` and ``record``, the ``base``, the factors, the dropout ``p`` and ``graph`` (an
    autograd node is needed: dropout, or gradients for x or a factor)."""

    name: str
    record: AdapterRecord
    base: QuantisedBase
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    p: float
    graph: bool


def quantised_plan(layer: Linear, x: torch.Tensor) -> QuantisedPlan | None:
    """``layer``'s ``QuantisedPlan`` on ``x``, or None when the reference path must run (see the module docstring).
    A layer without ``quantised_base`` (a plain Linear in the same shared-input run) gets None."""
    if not call_allows_fast_path(layer):
        return None
    if not x.dtype.is_floating_point or autocast_active(x.device):
        return None
    base_of = getattr(type(layer), "quantised_base", None)
    base = None if base_of is None else base_of(layer, x)
    if base is None:
        return None
    factors = active_factors(layer, x)
    if factors is None or factors[1].variant is not None:
        return None
    name, record, p, lora_a, lora_b = factors
    graph = p > 0.0 or (torch.is_grad_enabled() and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad))
    return QuantisedPlan(name, record, base, lora_a, lora_b, p, graph)


def _group_run(x: torch.Tensor, plans: list[QuantisedPlan], layers: list[Linear]) -> tuple[torch.Tensor, ...]:
    """Every member's output through one node (``shared_inputs`` checked they are alike: no dropout, same graph)."""
    if plans[0].graph:
        return quantised_lora(x, [(q.base, q.lora_a, q.lora_b, q.record.scaling) for q in plans])
    casts = [cast_factors(m, q.name, x.dtype) for m, q in zip(layers, plans)]  # cached per layer
    return quantised_lora_inference(x, [(q.base, a, b, q.record.scaling) for q, (a, b) in zip(plans, casts)])


def quantised_forward(layer: Linear, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """y = base(x) + s * B A dropout(x) through the quantised node (shared with the layers that read the same x),
    or None when the reference path must run.

    Args:
        x: (..., in)
    Returns:
        (..., out) in x's dtype, or None
    """
    if args or kwargs:
        return None
    kept = kept_output(layer, x)  # computed by the first layer of its shared-input group, which checked this one
    if kept is not None:
        return kept
    plan = quantised_plan(layer, x)
    if plan is None:
        return None
    if plan.p == 0.0:
        shared = shared_forward(layer, x, plan, quantised_plan, run=_group_run)
        if shared is not None:
            return shared
    if plan.graph:
        return quantised_lora(x, [(plan.base, plan.lora_a, plan.lora_b, plan.record.scaling)], plan.p)[0]
    return _group_run(x, [plan], [layer])[0]
