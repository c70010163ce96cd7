"""The LoRA delta-weight math, in one place. Merge, unmerge, weighted combination and export all call this;
layer types only reshape the (out, in) matrix into their weight layout.

LoRA (arXiv:2106.09685): W' = W + s * B @ A with s = alpha / r, or alpha / sqrt(r) for rsLoRA (arXiv:2312.03732).
"""

from __future__ import annotations

import math

import torch


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rank-stabilised scaling."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def delta_matrix(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """s * B @ A computed in float32; batched over leading dims (one delta per MoE expert).

    Args:
        lora_a: (r, in) or (E, r, in)
        lora_b: (out, r) or (E, out, r)
    Returns:
        (out, in) or (E, out, in) float32
    """
    return (lora_b.float() @ lora_a.float()) * scaling


def add_low_rank(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scaling: float) -> torch.Tensor:
    """weight + s * left @ right in weight's dtype, as one fused (b)addmm: no separate delta tensor is built.

    Used while a module runs with an adapted parameter (``target_parameters``); ``left @ right`` is B @ A, or
    A^T @ B^T for parameters stored transposed.

    Args:
        weight: (m, n) or (E, m, n)
        left: (m, r) or (E, m, r)
        right: (r, n) or (E, r, n)
    Returns:
        a new tensor shaped and typed like weight
    """
    left, right = left.to(weight.dtype), right.to(weight.dtype)
    fused = torch.addmm if weight.dim() == 2 else torch.baddbmm
    with torch.autocast(device_type=weight.device.type, enabled=False):  # keep the parameter's dtype
        return fused(weight, left, right, alpha=scaling)


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """weight + sign * delta computed in float32 and cast back to weight's dtype (same shape as weight)."""
    return (weight.float() + sign * delta.to(weight.device)).to(weight.dtype)
