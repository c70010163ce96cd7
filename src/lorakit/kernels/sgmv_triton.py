"""Gathered LoRA for mixed-adapter batches as Triton kernels (punica's SGMV for prefill, BGMV for decode;
arXiv:2310.18547). Rows (sequences) keep their order; each program reads its row's adapter from the stack.

Triton is imported on first use only. ``reference_gathered_lora`` in ``gathered.py`` is the reference; the tests
compare on random inputs (on CUDA, or on CPU under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch


def _kernels():
    from . import _sgmv_triton_kernels  # imports triton

    return _sgmv_triton_kernels


def _launch_shapes(length: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, SPLIT_K): long rows tile the tokens; short rows (decode) split the reduction instead."""
    if length >= 64:
        return 64, 64, 1
    block_m = 16 if length <= 16 else 32
    return block_m, 128, max(1, min(8, k // 512))


def sgmv_shrink(x: torch.Tensor, stack_a: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """h[i] = x[i] A[slots[i]]^T.

    Args:
        x: (rows, L, in), last dim contiguous; stack_a: (S, R, in) contiguous, R a power of two >= 16; slots: (rows,)
    Returns:
        (rows, L, R) float32
    """
    k = _kernels()
    rows, length, in_features = x.shape
    rank = stack_a.shape[1]
    block_m, block_k, split_k = _launch_shapes(length, in_features)
    alloc = torch.zeros if split_k > 1 else torch.empty
    h = alloc(rows, length, rank, device=x.device, dtype=torch.float32)
    grid = (rows, -(-length // block_m), split_k)
    k.shrink_kernel[grid](
        x, stack_a, slots, h, length, in_features,
        x.stride(0), x.stride(1), stack_a.stride(0), stack_a.stride(1), h.stride(0), h.stride(1),
        R=rank, BLOCK_M=block_m, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=4,
    )  # fmt: skip
    return h


def sgmv_expand(
    h: torch.Tensor, stack_b: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """z[i] = h[i] B[slots[i]]^T (+ bias).

    Args:
        h: (rows, L, R) float32; stack_b: (S, out, R) contiguous; slots: (rows,); bias: (out,) or None
    Returns:
        (rows, L, out) in ``dtype``
    """
    k = _kernels()
    rows, length, rank = h.shape
    out_features = stack_b.shape[1]
    block_m = 64 if length >= 64 else 16
    block_n = 128
    z = torch.empty(rows, length, out_features, device=h.device, dtype=dtype)
    grid = (rows, -(-length // block_m), -(-out_features // block_n))
    k.expand_kernel[grid](
        h, stack_b, slots, bias if bias is not None else z, z, length, out_features,
        h.stride(0), h.stride(1), stack_b.stride(0), stack_b.stride(1), z.stride(0), z.stride(1),
        HAS_BIAS=bias is not None, R=rank, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip
    return z


def triton_gathered_lora(
    x: torch.Tensor,
    stack_a: torch.Tensor,
    stack_b: torch.Tensor,
    slots: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """z = x A_slot^T B_slot^T (+ bias) per row; same contract as ``gathered.gathered_lora`` on stacks.

    Args:
        x: (rows, L, in); stack_a: (S, R, in); stack_b: (S, out, R); slots: (rows,) long; bias: (out,) or None
    Returns:
        (rows, L, out) in x's dtype
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    return sgmv_expand(sgmv_shrink(x, stack_a, slots), stack_b, slots, x.dtype, bias)
