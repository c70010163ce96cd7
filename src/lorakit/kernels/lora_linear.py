"""Fused LoRA linear: y = x W^T + b + s * B A dropout(x), one autograd node, computed in the activation dtype.

LoRA (arXiv:2106.09685). The reference (``reference_lora_linear``) is what the layer's readable path computes: the
base output, then the adapter term in the adapter's dtype (float32 masters upcast x), then a scale pass and an add.
The fast path (``fused_lora_linear``) differs only in where the work happens:

* the adapter factors are cast to the activation dtype (float32 master weights stay the parameters; their grads
  come back in float32), so both LoRA matmuls run on the tensor cores and no float32 copy of x is ever made;
* the scale s rides in the GEMMs' alpha (cuBLAS applies it to the float32 accumulator before rounding: no
  separate scale pass, and one launch fewer per use), and the add into the base GEMM's epilogue:
  ``out = s * h B^T (+ b)`` with ``h = dropout(x) A^T`` (N x r), then ``out.addmm_(x, W^T)`` accumulates the base
  product onto it (beta = 1), so the output is written once more instead of three times;
* backward is derived by hand and saves only x (which callers usually keep anyway), the bool dropout mask, the
  N x r intermediate h and the (tiny) cast factors. With g = dY B (N x r):

      dX = dY W + s * (g A) * mask / (1 - p)     (the low-rank part first, then .addmm_(dY, W) onto it)
      dA = s * g^T dropout(x)                    (dropout(x) recomputed from x and the mask)
      dB = s * dY^T h

  The frozen base weight gets no gradient unless it requires one (then dW = dY^T x, db = sum dY).

On a GPU each aten call costs host time (dispatch and launch, ~10-20 us on a busy step) that a hundred LoRA layers
multiply, so the node keeps the count low: per layer 5 calls forward (two casts, three GEMMs) and 7 backward.

Shapes: x (N, in) (the node also takes (..., in) and flattens it itself), W (out, in), b (out,), A (r, in),
B (out, r), mask (N, in) bool.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from . import factor_casts
from .node_output import as_output


def reference_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
    p: float = 0.0,
) -> torch.Tensor:
    """The readable formula, as the layer's reference path computes it (x upcast to the factors' dtype).

    Args:
        x: (N, in); weight: (out, in); bias: (out,) or None; lora_a: (r, in); lora_b: (out, r)
        dropout_mask: (N, in) bool keep-mask of the adapter dropout (None: no dropout)
    Returns:
        (N, out) in x's dtype
    """
    result = F.linear(x, weight, bias)
    xd = x.to(lora_a.dtype)
    if dropout_mask is not None:
        xd = xd * dropout_mask / (1.0 - p)
    # (N, in) @ (in, r) -> (N, r) @ (r, out) -> (N, out)
    return result + (F.linear(F.linear(xd, lora_a), lora_b) * scaling).to(result.dtype)


# Weight gradients reduce over all N tokens into tiny (r, in) / (out, r) outputs; one GEMM then runs on very few
# thread blocks. On CUDA the reduction is split into this many token chunks (a batched matmul, summed in float32).
# 1 = one plain GEMM. ``benchmarks/run.py --tune`` picked 8 on the H200 (LoRA step 1.34x -> 1.20x the floor).
WGRAD_CHUNKS = 8


_SCALARS: dict[tuple[float, torch.dtype, torch.device], torch.Tensor] = {}


def cached_scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dim tensor holding ``value``, made once per (value, dtype, device): an op input that broadcasts (e.g.
    ``addcmul``'s), or the ignored input of ``addmm`` / ``baddbmm`` with beta = 0. Never written to."""
    key = (value, dtype, device)
    scalar = _SCALARS.get(key)
    if scalar is None:
        scalar = _SCALARS[key] = torch.full((), value, dtype=dtype, device=device)
    return scalar


def _ignored(like: torch.Tensor) -> torch.Tensor:
    """The input of ``addmm`` / ``baddbmm`` with beta = 0 (never read: cuBLAS skips it)."""
    return cached_scalar(0.0, like.dtype, like.device)


def scaled_mm(left: torch.Tensor, right: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * left @ right in one GEMM (the scale applied to the float32 accumulator). left: (n, k); right: (k, m)."""
    if scale == 1.0:
        return left @ right
    return torch.addmm(_ignored(left), left, right, beta=0, alpha=scale)


def weight_grad(
    left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, strided: bool = False
) -> torch.Tensor:
    """scale * left^T @ right in ``dtype``, reduced over the N rows (in ``WGRAD_CHUNKS`` chunks on CUDA).

    Args:
        left: (N, p); right: (N, q); ``strided``: chunk them even when not contiguous (see chunked_weight_grad)
    Returns:
        (p, q)
    """
    if WGRAD_CHUNKS > 1 and left.is_cuda:
        return chunked_weight_grad(left, right, dtype, WGRAD_CHUNKS, scale, strided)
    grad = scaled_mm(left.t(), right, scale)  # (p, N) @ (N, q): one GEMM (this runs twice per layer per step)
    return grad if grad.dtype == dtype else grad.to(dtype)


def chunked_weight_grad(
    left: torch.Tensor,
    right: torch.Tensor,
    dtype: torch.dtype,
    chunks: int,
    scale: float = 1.0,
    strided: bool = False,
) -> torch.Tensor:
    """scale * left^T @ right as a batched matmul over ``chunks`` token chunks, summed in float32 (1: one GEMM).

    Args:
        left: (N, p); right: (N, q), contiguous, or any strides with ``strided`` (column slices of a wider
            tensor, a transposed view): splitting N is a view whatever the strides, and the batched GEMM reads
            each chunk in place as long as one of its two strides is 1
    Returns:
        (p, q)
    """
    n = left.shape[0]
    contiguous = strided or (left.is_contiguous() and right.is_contiguous())
    if chunks <= 1 or n % chunks or n < 64 * chunks or not contiguous:
        grad = scaled_mm(left.t(), right, scale)
        return grad if grad.dtype == dtype else grad.to(dtype)
    left3 = left.unflatten(0, (chunks, n // chunks))  # (C, N/C, p)
    right3 = right.unflatten(0, (chunks, n // chunks))  # (C, N/C, q)
    # (C, p, N/C) @ (C, N/C, q) -> (C, p, q), scaled in the accumulator, then summed over chunks in float32
    grad = torch.baddbmm(_ignored(left), left3.transpose(1, 2), right3, beta=0, alpha=scale).sum(0, dtype=torch.float32)
    return grad if grad.dtype == dtype else grad.to(dtype)


def _lora_plus_base(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    h: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """s * h B^T (+ bias), then x W^T accumulated onto it by the base GEMM (beta = 1). h: (N, r), b: (out, r)."""
    # (N, r) @ (r, out) -> (N, out), the scale in the GEMM's alpha
    out = torch.addmm(bias, h, b.t(), alpha=scaling) if bias is not None else scaled_mm(h, b.t(), scaling)
    return out.addmm_(x, weight.t())  # + (N, in) @ (in, out)


def lora_linear_inference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """The fused forward without autograd bookkeeping (no dropout: inference). Factors already in x's dtype.

    Args:
        x: (N, in); weight: (out, in); bias: (out,) or None; lora_a: (r, in); lora_b: (out, r)
    Returns:
        (N, out) in x's dtype
    """
    return _lora_plus_base(x, weight, bias, x @ lora_a.t(), lora_b, scaling)  # h = x A^T: (N, r)


class FusedLoraLinear(torch.autograd.Function):
    """One autograd node for base + LoRA; see the module docstring for the math and what is saved."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        p: float,
        a_cast: torch.Tensor | None = None,
        b_cast: torch.Tensor | None = None,
    ) -> torch.Tensor:
        need_dx, need_dw, _, need_da, need_db = ctx.needs_input_grad[:5]
        shape = x.shape
        if x.dim() != 2:  # flattened here, not by the caller: no view nodes in the graph (host time per layer)
            x = x.reshape(-1, shape[-1])
        # the factors in x's dtype: given (cast for the whole model call at once, ``factor_casts``) or cast here
        a = a_cast if a_cast is not None else lora_a if lora_a.dtype == x.dtype else lora_a.to(x.dtype)  # (r, in)
        b = b_cast if b_cast is not None else lora_b if lora_b.dtype == x.dtype else lora_b.to(x.dtype)  # (out, r)
        mask = None
        xd = x
        if p > 0.0:
            xd, mask = torch.native_dropout(x, p, True)
        h = xd @ a.t()  # (N, r) = dropout(x) A^T
        out = _lora_plus_base(x, weight, bias, h, b, scaling)
        ctx.scaling, ctx.p, ctx.shape = scaling, p, shape
        ctx.dtypes = (lora_a.dtype, lora_b.dtype)
        ctx.save_for_backward(
            x if (need_da or need_dw) else None,
            mask,
            weight if need_dx else None,
            a if need_dx else None,
            b if (need_dx or need_da) else None,
            h if need_db else None,
        )
        return as_output(out, shape[:-1])  # (..., out), not a view: the caller may edit it in place

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, mask, weight, a, b, h = ctx.saved_tensors
        need_dx, need_dw, need_dbias, need_da, need_db = ctx.needs_input_grad[:5]
        dy = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()  # (N, out)
        s, p = ctx.scaling, ctx.p
        keep = 1.0 / (1.0 - p)  # dropout's rescaling of the kept entries
        g = dy @ b if (need_dx or need_da) else None  # (N, r) = dY B
        dx = dw = dbias = da = db = None
        if need_dx:
            if mask is None:
                dx = scaled_mm(g, a, s)  # (N, r) @ (r, in) -> (N, in), times s
            else:
                dx = scaled_mm(g, a, s * keep).mul_(mask)
            dx.addmm_(dy, weight)  # + dY W: the base backward GEMM accumulates onto the LoRA part
            dx = dx.view(ctx.shape)
        if need_da:
            xd, scale = (x, s) if mask is None else (x * mask, s * keep)
            da = weight_grad(g, xd, ctx.dtypes[0], scale)  # (r, N) @ (N, in) -> (r, in)
        if need_db:
            db = weight_grad(dy, h, ctx.dtypes[1], s)  # (out, N) @ (N, r) -> (out, r)
        if need_dw:
            dw = weight_grad(dy, x, x.dtype)  # (out, in)
        if need_dbias:
            dbias = dy.sum(0)
        return dx, dw, dbias, da, db, None, None, None, None


def fused_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    p: float = 0.0,
) -> torch.Tensor:
    """y = x W^T + b + s * B A dropout_p(x), in x's dtype; gradients for whichever inputs require them.

    Args:
        x: (..., in); weight: (out, in); bias: (out,) or None; lora_a: (r, in); lora_b: (out, r) (any float dtype)
        p: dropout probability on x before A (0: none)
    Returns:
        (..., out) in x's dtype
    """
    graph = p > 0.0 or (
        torch.is_grad_enabled()
        and (x.requires_grad or lora_a.requires_grad or lora_b.requires_grad or weight.requires_grad)
    )
    if not graph:
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    return fused_call(x, weight, bias, lora_a, lora_b, scaling, p, graph)


def fused_call(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    p: float,
    graph: bool,
) -> torch.Tensor:
    """``fused_lora_linear`` once the caller has decided: ``graph`` -> the autograd node (dropout or gradients),
    else the plain inference ops with factors already in x's dtype. Shapes as there."""
    if graph:  # the node flattens (..., in) itself
        batch = factor_casts.current()
        if batch is not None and lora_a.dtype != x.dtype and lora_b.dtype != x.dtype:
            a_cast, b_cast = batch.cast(lora_a, x.dtype), batch.cast(lora_b, x.dtype)
            return FusedLoraLinear.apply(x, weight, bias, lora_a, lora_b, scaling, p, a_cast, b_cast)
        return FusedLoraLinear.apply(x, weight, bias, lora_a, lora_b, scaling, p)
    if x.dim() == 2:
        return lora_linear_inference(x, weight, bias, lora_a, lora_b, scaling)
    out = lora_linear_inference(x.reshape(-1, x.shape[-1]), weight, bias, lora_a, lora_b, scaling)
    return as_output(out, x.shape[:-1])


def fast_lora_term(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, dropout: torch.nn.Module
) -> torch.Tensor:
    """s * B A dropout(x) in x's dtype with plain autograd ops: no float32 copy of x, scale folded into the rank-r
    intermediate. For the cases the fused node does not cover (several active adapters, variants, mixed batches).

    Args:
        x: (..., in); lora_a: (r, in); lora_b: (out, r)
    Returns:
        (..., out) in x's dtype
    """
    # (..., in) @ (in, r) -> (..., r) @ (r, out) -> (..., out)
    return F.linear(F.linear(dropout(x), lora_a.to(x.dtype)) * scaling, lora_b.to(x.dtype))
