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
    """s * B @ A computed in float32.

    Args:
        lora_a: (r, in)
        lora_b: (out, r)
    Returns:
        (out, in) float32
    """
    return (lora_b.float() @ lora_a.float()) * scaling


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    """weight + sign * delta computed in float32 and cast back to weight's dtype (same shape as weight)."""
    return (weight.float() + sign * delta.to(weight.device)).to(weight.dtype)
