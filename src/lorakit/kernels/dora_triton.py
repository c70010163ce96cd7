"""Triton versions of the fused DoRA Linear's small steps (CUDA only; Triton is imported on first use).

``triton_factors`` stands in for the torch tail of ``dora_linear.dora_factors`` (a dozen (out,)/(out, r) ops, one
launch), ``triton_magnitude_grad`` for the magnitude's gradient in backward (one read of g and y instead of writing
their product). ``dora_linear`` uses them on CUDA tensors as ``MODE`` says; the torch path is the
reference, and ``tests/kernels/test_dora_triton.py`` compares the two on random inputs (skipped without CUDA).
"""

from __future__ import annotations

import os

import torch

from .switch import triton_available

MODES = ("0", "auto", "1")
MODE = os.environ.get("LORAKIT_DORA_TRITON", "auto")
"""Which steps run in Triton on CUDA (``LORAKIT_DORA_TRITON`` in the environment, or set this attribute):

* ``"auto"`` (the default): the magnitude's gradient of large layers (``triton_magnitude_grad``: one read of g and
  y, where torch writes their product and reads it again: four passes over an (N, out) tensor become two; see
  ``GRAD_MIN_ELEMENTS``); the factors
  stay on torch, computed per group of same-shape layers (``dora_batch``: fewer launches than one Triton launch per
  layer on a host-bound step);
* ``"1"``: the factors too (``triton_factors``, one launch per layer instead of the batched torch ops);
* ``"0"``: no Triton (the torch ops everywhere)."""


def _mode() -> str:
    if MODE not in MODES:
        raise ValueError(f"LORAKIT_DORA_TRITON={MODE!r} is not a known setting; use one of {', '.join(MODES)}.")
    return MODE


def _kernels():
    from . import _dora_triton_kernels  # imports triton

    return _dora_triton_kernels


def use_triton(x: torch.Tensor) -> bool:
    """Whether the fused DoRA node computes its factors with Triton for activations ``x`` (``MODE == "1"``)."""
    return _mode() == "1" and x.is_cuda and triton_available()


GRAD_MIN_ELEMENTS = 1 << 25
"""``"auto"`` takes the Triton magnitude gradient only for an (N, out) output of at least this many elements (a
64 MiB bfloat16 tensor). Measured on the H200 (``benchmarks/bench_skinny.py --dora``): one Triton launch costs
about 60 us of host time against about 40 us for the three torch ops, and the two passes it saves over g and y are
worth more than that difference only from about this size (the 1.1B model's gate and up projections, 8192 x 5632)."""


def use_triton_grad(x: torch.Tensor, out_features: int) -> bool:
    """Whether the fused DoRA node's backward takes the magnitude's gradient from Triton for activations ``x``
    (N, in) and ``out_features`` outputs: ``MODE`` "1", or "auto" for outputs of ``GRAD_MIN_ELEMENTS`` or more."""
    mode = _mode()
    if mode == "0" or not x.is_cuda:
        return False
    if mode == "auto" and x.shape[0] * out_features < GRAD_MIN_ELEMENTS:
        return False
    return triton_available()


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
