"""The DoRA column norm ||W + s B A|| per output channel, without building s B A or a d x d identity.

DoRA (arXiv:2402.09353) divides every output channel by the norm of its row of the adapted weight. Expanding the
square keeps the work at one read of W and O(out * in * r) flops:

    ||W_o + s (B A)_o||^2 = ||W_o||^2 + 2 s <B_o, (W A^T)_o> + s^2 B_o (A A^T) B_o^T

``weight_norm`` is that fast path; ``weight_norm_reference`` forms W + s B A in float32 row blocks and is the
readable reference the tests hold the fast path to.
"""

from __future__ import annotations

import torch

from ..kernels.dora_linear import row_squares

_ROW_BLOCK = 1024  # rows of W + s B A formed at once by the reference (bounds its float32 temporary)


@torch.no_grad()
def weight_norm(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """Row norms of W + s B A, float32, by the expanded square.

    Args:
        weight: (out, in) base weight in any float dtype, any strides (a transposed view is fine)
        lora_a: (r, in)
        lora_b: (out, r)
        scaling: s
    Returns:
        (out,) float32 (float64 for a float64 weight) on ``weight``'s device

    ``W A^T`` runs in the weight's dtype (one read of W, float32 accumulation); its rounding enters the norm
    scaled by ||s B A|| / ||W||, far below the rounding of W itself. ||W||^2 is accumulated in float32.
    """
    device, acc = weight.device, torch.promote_types(weight.dtype, torch.float32)
    a32 = lora_a.to(device=device, dtype=acc)
    b32 = lora_b.to(device=device, dtype=acc)
    squares = row_squares(weight, acc)  # (out,)
    # (out, in) @ (in, r) -> (out, r): W's projection on the rows of A
    proj = (weight @ a32.to(weight.dtype).T).to(acc)
    cross = (proj * b32).sum(dim=1)  # <B_o, (W A^T)_o>
    gram = a32 @ a32.T  # (r, r)
    lora_sq = ((b32 @ gram) * b32).sum(dim=1)  # ||(B A)_o||^2
    norm_sq = squares + (2.0 * scaling) * cross + (scaling * scaling) * lora_sq
    return norm_sq.clamp_min(0.0).sqrt()


@torch.no_grad()
def weight_norm_reference(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Row norms of W + s B A formed explicitly in float32, ``_ROW_BLOCK`` rows at a time.

    Same arguments and result as ``weight_norm``; also the norm that merging uses, where W + s B A is built anyway.
    """
    device, acc = weight.device, torch.promote_types(weight.dtype, torch.float32)
    a32 = lora_a.to(device=device, dtype=acc)
    b32 = lora_b.to(device=device, dtype=acc)
    out = torch.empty(weight.shape[0], dtype=acc, device=device)
    for start in range(0, weight.shape[0], _ROW_BLOCK):
        rows = slice(start, start + _ROW_BLOCK)
        # (rows, r) @ (r, in) -> (rows, in), added to W's rows
        block = torch.addmm(weight[rows].to(acc), b32[rows], a32, alpha=scaling)
        out[rows] = torch.linalg.vector_norm(block, dim=1)
    return out
