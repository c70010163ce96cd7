"""Triton versions of the fused DoRA Linear's small steps (CUDA only; Triton is imported on first use).

``triton_factors`` stands in for the torch tail of ``dora_linear.dora_factors`` (a dozen (out,)/(out, r) ops, one
launch), ``triton_magnitude_grad`` for the magnitude's gradient in backward (one read of g and y instead of writing
their product). ``dora_linear`` uses them on CUDA tensors when ``use_triton()`` says so; the torch path is the
reference, and ``tests/kernels/test_dora_triton.py`` compares the two on random inputs (skipped without CUDA).
"""

from __future__ import annotations

import os

import torch

from .switch import triton_available

ENABLED = os.environ.get("LORAKIT_DORA_TRITON", "0") == "1"
"""Module switch, off by default: ``LORAKIT_DORA_TRITON=1`` in the environment (or setting this to True) runs the
Triton steps on CUDA. On the H200 benchmark (docs/benchmarks.md, DoRA) the whole step was host-bound and the torch
ops gave the better median in both runs (151.4 vs 157.1 ms, 161.3 vs 191.7 ms): each Triton launch costs more host
time than the few small torch ops it replaces at this size, though each kernel alone is faster."""


def _kernels():
    from . import _dora_triton_kernels  # imports triton

    return _dora_triton_kernels


def use_triton(x: torch.Tensor) -> bool:
    """Whether the fused DoRA node runs its Triton steps for activations ``x``: CUDA, Triton present, enabled."""
    return ENABLED and x.is_cuda and triton_available()


def triton_factors(
    wa: torch.Tensor,
    lora_b: torch.Tensor,
    gram: torch.Tensor,
    wsq: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    floor: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """k, s k, 1 / (k n) as (out, 1) float32 columns and B' = s k B (out, r) in ``dtype``; see ``dora_factors``.

    Args:
        wa: (out, r) W A^T, contiguous, any float dtype; lora_b: (out, r) contiguous; gram: (r, r) float32 A A^T;
        wsq: (out,) float32 ||W_o||^2; magnitude: (out,) contiguous
    """
    out_features, rank = lora_b.shape
    kvec = torch.empty(3, out_features, 1, device=wa.device, dtype=torch.float32)
    kb = torch.empty(out_features, rank, device=wa.device, dtype=dtype)
    rp = max(2, 1 << (rank - 1).bit_length())  # the rank padded to a power of two (tl.arange)
    block_o = max(1, min(64, 4096 // (rp * rp)))
    block_o = 1 << (block_o.bit_length() - 1)  # a power of two
    grid = (-(-out_features // block_o),)
    _kernels().factors_kernel[grid](
        wa.contiguous(), lora_b.contiguous(), gram.contiguous(), wsq, magnitude.contiguous(), kb, kvec,
        out_features, rank, float(scaling), float(floor),
        RP=rp, BLOCK_O=block_o, num_warps=4,
    )  # fmt: skip
    k_col, ks_col, inv_col = kvec.unbind(0)
    return k_col, ks_col, inv_col, kb


def triton_magnitude_grad(
    g: torch.Tensor, y: torch.Tensor, bias: torch.Tensor | None, inv: torch.Tensor, with_bias_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dm, db): dm_o = inv_o sum_N g_no (y_no - b_o) and db_o = sum_N g_no (None unless ``with_bias_grad``),
    (out,) float32, summed over token chunks deterministically.

    Args:
        g: (N, out), y: (N, out), last dims contiguous; bias: (out,) or None; inv: (out, 1) float32, 1 / (k n)
    """
    n, out_features = g.shape
    block_o, block_n = 128, 32
    col_blocks = -(-out_features // block_o)
    chunks = max(1, min(-(-n // block_n), (4 * 132) // col_blocks))  # ~4 programs per H200 multiprocessor
    rows_per_chunk = -(-n // chunks)
    rows_per_chunk = -(-rows_per_chunk // block_n) * block_n
    chunks = -(-n // rows_per_chunk)
    has_bias = bias is not None
    part = torch.empty(2 if has_bias else 1, chunks, out_features, device=g.device, dtype=torch.float32)
    _kernels().colsum_kernel[(col_blocks, chunks)](
        g, y, bias if has_bias else g, inv, part, n, out_features, rows_per_chunk, g.stride(0), y.stride(0),
        HAS_BIAS=has_bias, BLOCK_N=block_n, BLOCK_O=block_o, num_warps=4,
    )  # fmt: skip
    sums = part.sum(1)  # (1 or 2, out)
    if not has_bias:
        return sums[0], None
    dm, db = sums.unbind(0)
    return dm, db if with_bias_grad else None
