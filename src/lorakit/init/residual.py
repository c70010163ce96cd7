"""Shared pieces of the inits that move part of W into the adapter (PiSSA, OLoRA, CorDA).

They all end the same way: the adapter starts as s * B @ A = (a slice of W), and the base weight keeps the
residual W - s * B @ A, so the layer's output is unchanged at initialisation.
"""

from __future__ import annotations

import torch

from ..delta import delta_matrix
from .registry import InitRequest, InitResult

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def base_dtype(req: InitRequest) -> torch.dtype | None:
    """dtype of the layer's stored base weight (None when the request carries no layer)."""
    layer = req.layer
    if layer is None or not hasattr(layer, "get_base_layer"):
        return None
    return layer.get_base_layer().weight.dtype


def require_float_base(req: InitRequest, method: str) -> None:
    """PiSSA and CorDA decompose the stored weight: it must be fp32/fp16/bf16 (quantise the residual afterwards)."""
    dtype = base_dtype(req)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"init_lora_weights={method!r} needs a float32/float16/bfloat16 base weight, but layer "
            f"{req.module_name!r} stores {dtype}. Initialise in floating point, then quantise the residual model."
        )


def matrix_weight(req: InitRequest, method: str) -> torch.Tensor:
    """The (out, in) float32 base weight; a layer without one (e.g. a grouped conv) raises naming the layer."""
    try:
        return req.base_weight()
    except ValueError as err:
        raise ValueError(
            f"init_lora_weights={method!r} cannot initialise layer {req.module_name!r} ({req.layer_kind}): {err}"
        ) from None


def require_rank_fits(req: InitRequest, weight: torch.Tensor, method: str) -> None:
    """A rank-r slice of an (out, in) matrix needs r <= min(out, in)."""
    if req.rank > min(weight.shape):
        raise ValueError(
            f"init_lora_weights={method!r} takes the first r components of the weight, but layer "
            f"{req.module_name!r} has a {tuple(weight.shape)} weight (at most {min(weight.shape)} components) "
            f"and r={req.rank}. Lower r for this layer (rank_pattern)."
        )


def with_residual(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> InitResult:
    """InitResult whose base weight is W - s * B @ A.

    Args:
        weight: (out, in) float32
        lora_a: (r, in)
        lora_b: (out, r)
    """
    residual = weight - delta_matrix(lora_a, lora_b, scaling)
    return InitResult(lora_a.contiguous(), lora_b.contiguous(), base_weight=residual)


def split_singular_values(
    u_r: torch.Tensor, s_r: torch.Tensor, vh_r: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors with s * B @ A = U_r diag(S_r) Vh_r: the singular values are divided by s, then split evenly.

    Args:
        u_r: (out, r); s_r: (r,); vh_r: (r, in)
    Returns:
        A (r, in) = diag(sqrt(S_r / s)) Vh_r, B (out, r) = U_r diag(sqrt(S_r / s))
    """
    root = (s_r / scaling).sqrt()
    return root[:, None] * vh_r, u_r * root[None, :]
