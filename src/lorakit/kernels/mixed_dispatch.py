"""Mixed-adapter batches on a LoRA Linear without a Python loop over adapters.

Plan, once per (layer, routing): the layer's stacked adapters (``adapter_stack``), each row's slot, and the backend:
Triton SGMV/BGMV kernels on CUDA for fp16/bf16 when Triton is there, else gather + bmm (``gathered``). The plan is
kept in the routing's per-call ``scratch`` (keyed by the layer), so it lives exactly as long as the routed call (one
model call, or one ``generate``: decode steps then skip all bookkeeping) and concurrent calls never share one;
adapter weights are assumed not to change within one routed call.

Then per call: z = x A_row^T B_row^T (scaling in the stacked B), and the base GEMM accumulates onto z
(``z.addmm_(x, W^T)``), so a mixed batch costs one base matmul plus two rank-r passes, whatever the number of
adapters. Returns None (reference path) for what it does not cover: variants, lora_bias, dropout in training mode,
gradients into the adapters, fan_in_fan_out bases handled generically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..routing import BASE_ADAPTER
from .adapter_stack import AdapterStack, adapter_stack, row_slots
from .eligibility import autocast_active, dropout_probability, global_hooks_present, plain_linear
from .gathered import gather_factors, gathered_lora
from .switch import fast_paths_enabled, triton_available

if TYPE_CHECKING:
    from ..layers.base import LoraLayer
    from ..routing import BatchRouting

# Gathered per-row factors are kept for the routing's lifetime below this many elements per layer (decode reuse).
GATHER_CACHE_ELEMENTS = 1 << 24

# Which backend runs mixed batches on CUDA: "triton", "torch" (gather + bmm), or "auto": Triton SGMV for rows of at
# least TRITON_MIN_TOKENS tokens (prefill), cached gathers + bmm below (decode). Chosen from the H200 benchmark
# (docs/benchmarks.md): Triton 1.29x base vs torch 1.61x on prefill with 32 adapters; torch 1.21x vs 1.83x on decode.
CUDA_BACKEND = "auto"
TRITON_MIN_TOKENS = 16


@dataclass
class MixedPlan:
    """One layer's plan for one routing (stored in ``routing.scratch[layer]``)."""

    dtype: torch.dtype
    device: torch.device
    stack: AdapterStack
    slots: torch.Tensor  # (rows,) long
    a_rows: torch.Tensor | None = None  # (rows, R, in), gathered on first use when small enough
    b_rows: torch.Tensor | None = None  # (rows, out, R)
    # set after the first call passed every check: (weight, bias) of a base fused into the epilogue, or None for a
    # base run as a module; later calls of the same routing (decode steps) go straight to ``run_planned``
    fused_base: tuple[torch.Tensor, torch.Tensor | None] | None = None
    checked: bool = False

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's factors; kept for the routing's lifetime (decode steps) below GATHER_CACHE_ELEMENTS."""
        if self.a_rows is not None:
            return self.a_rows, self.b_rows
        a_rows, b_rows = gather_factors(self.stack.a, self.stack.b, self.slots)
        if a_rows.numel() + b_rows.numel() <= GATHER_CACHE_ELEMENTS:
            self.a_rows, self.b_rows = a_rows, b_rows
        return a_rows, b_rows


def _routable(layer: LoraLayer, routing: BatchRouting, stack: AdapterStack) -> bool:
    grad = torch.is_grad_enabled()
    dropouts = layer.__dict__["_modules"]["lora_dropout"]._modules
    records, stacked = layer.adapters, stack.slot_of  # the stack is current: it holds exactly the stackable adapters
    for name in routing.groups:
        if name == BASE_ADAPTER or name not in records:
            continue
        if name not in stacked or dropout_probability(dropouts[name]) != 0.0:
            return False
        if grad and any(p.requires_grad for p in (layer.lora_A[name].weight, layer.lora_B[name].weight)):
            return False  # the stack is a detached copy: let autograd see the real factors
    return True


def _choose_backend(x: torch.Tensor, needs_grad: bool) -> str:
    half = x.dtype in (torch.float16, torch.bfloat16)
    if x.device.type != "cuda" or not half or needs_grad or CUDA_BACKEND == "torch" or not triton_available():
        return "torch"
    tokens = x.shape[1]  # per row of (rows, L, in)
    return "triton" if CUDA_BACKEND == "triton" or tokens >= TRITON_MIN_TOKENS else "torch"


def _plan(layer: LoraLayer, x: torch.Tensor, routing: BatchRouting) -> MixedPlan | None:
    cached = routing.scratch.get(layer)
    if cached is not None and cached.dtype == x.dtype and cached.device == x.device:
        return cached if not torch.is_grad_enabled() or _routable(layer, routing, cached.stack) else None
    stack = adapter_stack(layer, x.dtype, x.device)
    if not _routable(layer, routing, stack):
        return None
    plan = MixedPlan(x.dtype, x.device, stack, row_slots(routing, stack, x.device))
    routing.scratch[layer] = plan
    return plan


def planned_for(layer: LoraLayer, routing: BatchRouting) -> bool:
    """Whether this layer already runs ``routing`` on a cached plan (it passed the mixed-batch checks for it)."""
    return layer in routing.scratch


def _adapter_part(plan: MixedPlan, x3: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(rows, L, in) -> (rows, L, out): each row's adapter term (+ bias)."""
    if _choose_backend(x3, torch.is_grad_enabled() and x3.requires_grad) == "triton":
        from .sgmv_triton import triton_gathered_lora

        return triton_gathered_lora(x3, plan.stack.a, plan.stack.b, plan.slots, bias)
    return gathered_lora(x3, *plan.gathered(), bias)


def fast_mixed_forward(
    layer: LoraLayer, x: torch.Tensor, routing: BatchRouting, args: tuple, kwargs: dict[str, Any]
) -> torch.Tensor | None:
    """Base output plus each row's adapter term, vectorised over adapters; None where the reference must run.

    Args:
        x: (rows, ..., in), rows == len(routing) (already expanded for generation)
    Returns:
        (rows, ..., out) in the base output's dtype, or None
    """
    if not fast_paths_enabled() or args or kwargs or layer.merged_adapters or layer.layer_kind != "linear":
        return None
    modules = layer.__dict__["_modules"]  # not nn.Module.__getattr__: this runs per layer per decode step
    if "lora_A" not in modules or not x.dtype.is_floating_point or x.dim() < 2 or global_hooks_present():
        return None
    if autocast_active(x.device) or torch.compiler.is_compiling():
        return None
    plan = _plan(layer, x, routing)
    if plan is None:
        return None
    base = modules["base_layer"]
    params = base.__dict__["_parameters"]
    fuse_base = plain_linear(base) and not layer.fan_in_fan_out and params["weight"].dtype == x.dtype
    plan.fused_base = (params["weight"], params["bias"]) if fuse_base else None
    plan.checked = True
    return run_planned(plan, base, x)


def planned_fast_lane(layer: LoraLayer, x: torch.Tensor, routing: BatchRouting) -> torch.Tensor | None:
    """The output from the layer's cached plan when this routing already passed every check on it (decode steps
    of one ``generate``, without gradients), else None. Skips the per-call checks: a routing lives for one model
    call or one ``generate``, during which hooks, merges and adapter weights do not change."""
    plan = routing.scratch.get(layer)
    if plan is None or not plan.checked or torch.is_grad_enabled():
        return None
    if x.dtype != plan.dtype or x.device != plan.device:
        return None
    return run_planned(plan, layer.__dict__["_modules"]["base_layer"], x)


def run_planned(plan: MixedPlan, base: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Base output plus each row's adapter term from a checked plan. x: (rows, ..., in) -> (rows, ..., out)."""
    rows, in_features = x.shape[0], x.shape[-1]
    x3 = x.reshape(rows, -1, in_features)  # (rows, L, in)
    fused = plan.fused_base
    z = _adapter_part(plan, x3, fused[1] if fused is not None else None)  # (rows, L, out)
    out_features = z.shape[-1]
    if fused is not None:
        z.view(-1, out_features).addmm_(x3.reshape(-1, in_features), fused[0].t())  # + x W^T in the epilogue
        return z.view(*x.shape[:-1], out_features)
    result = base(x)
    return result + z.view(*x.shape[:-1], out_features).to(result.dtype)
