"""Fused DoRA linear: y = b + k (x W^T + s (x A^T) B^T), k = m / ||W + s B A||_row, one node in the activation dtype.

DoRA (arXiv:2402.09353), the norm detached (section 4.3). The reference is ``variants/dora.py`` (base output, then
``DoraLinearFunction``); this node covers the common case of one active DoRA adapter on a plain ``nn.Linear``
without dropout (or in eval mode) and differs only in where the work happens, as ``lora_linear.FusedLoraLinear``:

* the norm by the expanded square, with few small ops: ||W_o||^2 is cached for the frozen W (``weight_sq``), then
  T = W A^T + (s/2) B (A A^T) (one read of W, an (out, r) result) and n^2 = ||W||^2 + 2 s <B_o, T_o>;
* k goes into the weights, not onto the output: W' = k W (out, in) and B' = k B (out, r) are formed with float32
  math and rounded once to the activation dtype (s rides in the GEMMs' alpha), then ``out = s hs B'^T (+ b)`` and
  ``out.addmm_(x, W'^T)`` with hs = x A^T (N, r). The output is rounded once, so a k within half an ulp of 1 still
  acts (rounding z = W x + ... first and scaling it afterwards would lose it), and the weight-sized pass for W'
  costs less than an output-sized one (out * in < N * out once N > in). No (N, out) float32 tensor is ever made.
* inside a call of the LoRA model the small ops behind k and B' run once per group of same-shape layers
  (``dora_batch``), not once per layer.
* backward, derived by hand, for g = dL/dy (N, out):

      dx = s (g B') A + g W'               (W' kept from forward: one weight-sized tensor per layer)
      dA = s (g B')^T x                    (``weight_grad``: chunked on CUDA)
      dB = s k * (g^T hs)
      dm = sum_N(g * (y - b)) / (k n)      (= sum_N(g z) / n; |k| floored at 1e-12 so the division is exact)
      db = sum_N(g)                        (only when the bias is trainable)

  Saved: x, hs, the cast A, B', W' (forming it again in backward cost a weight-sized pass, reading W and writing
  W', and two launches per layer: 3.9 GB of memory traffic per step of the 1.1B model, against 1.9 GB more peak
  memory), y (the output itself: the next layer usually keeps it anyway) and (out,) vectors.
  The caller may edit y in place (``y /= 2``, ``y += z``, as a plain ``nn.Linear``'s output): y is kept aside with
  its version (``node_output``), not saved the usual way, and when it was edited backward forms it again from x
  with the forward's own ops (one more (N, in) x (in, out) GEMM, only then), so the gradients do not change.
* on CUDA with Triton (``dora_triton``), dm of a large layer is one read of g and y (by default), and with
  ``LORAKIT_DORA_TRITON=1`` the norm's tail and the factors are one launch per layer instead of the batched torch
  ops.

Shapes: x (N, in) (the node flattens (..., in) itself), W (out, in), b (out,), A (r, in), B (out, r), m (out,).
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import torch

from . import factor_casts
from .dora_triton import use_triton, use_triton_grad
from .lora_linear import cached_scalar, scaled_mm, weight_grad
from .node_output import as_output, keep_output, kept_output

_K_FLOOR = 1e-12  # |k| floor: y / k must give z back for the magnitude's gradient (as variants/dora_autograd.py)


_ACCUMULATION = {torch.bfloat16: torch.float32, torch.float16: torch.float32, torch.float32: torch.float32}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 activations (a dict lookup: ``torch.promote_types`` is a dispatched op)."""
    return _ACCUMULATION.get(dtype, torch.float64)


@torch.no_grad()
def row_squares(weight: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """||W_o||^2 per row of an (out, in) weight, (out,) accumulated in ``acc``."""
    return torch.linalg.vector_norm(weight, dim=1, dtype=acc).square_()


def weight_sq(owner: Any, weight: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """||W_o||^2 per row, (out,) in ``acc``, cached on ``owner`` until W is replaced, re-pointed or edited in place.

    Args:
        owner: an object whose ``__dict__`` holds the cache (the LoRA layer)
        weight: (out, in), frozen
    """
    state = owner.__dict__
    key = (weight._version, weight.data_ptr(), weight.shape, weight.dtype, weight.device, acc)
    hit = state.get("_lorakit_dora_wsq")
    if hit is not None and hit[0]() is weight and hit[1] == key:
        return hit[2]
    sq = row_squares(weight, acc)
    state["_lorakit_dora_wsq"] = (weakref.ref(weight), key, sq)
    return sq


class DoraFactors(NamedTuple):
    """What the GEMMs of one DoRA Linear call use (no autograd).

    k_col: (out, 1) k = 1e-12 + m / ||W + s B A||, accumulation dtype; inv: 1 / (k n), (out,) or (out, 1), or None;
    at: (in, r) A^T and kb: (out, r) B' in the activation dtype, with s k B = kb_scale * B' (B' = k B and
    kb_scale = s on the torch path, B' = s k B and kb_scale = 1 from Triton): the GEMMs apply kb_scale as alpha.
    """

    k_col: torch.Tensor
    inv: torch.Tensor | None
    at: torch.Tensor
    kb: torch.Tensor
    kb_scale: float


_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # torch.mm(..., out_dtype=) (torch >= 2.8; CUDA only)


def projection(weight: torch.Tensor, at: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """W A^T (out, r) in ``acc``: one read of W, float32 accumulation; on CUDA the GEMM writes float32 itself."""
    if weight.dtype == acc:
        return weight @ at
    if weight.is_cuda and acc == torch.float32 and _MM_OUT_DTYPE:
        return torch.mm(weight, at, out_dtype=acc)
    return (weight @ at).to(acc)


def dora_factors(
    weight: torch.Tensor,
    wsq: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dtype: torch.dtype,
    with_inverse: bool = False,
    triton: bool = False,
) -> DoraFactors:
    """k = m / ||W + s B A|| per output row (|k| >= 1e-12) and the factors the GEMMs use (``DoraFactors``).

    Args:
        weight: (out, in) in ``dtype``; wsq: (out,) ||W_o||^2 in the accumulation dtype
        lora_a: (r, in); lora_b: (out, r); magnitude: (out,) (any float dtypes)

    Torch ops (the default): n^2 = ||W||^2 + 2 s <B_o, T_o> with T = W A^T + (s/2) B (A A^T), the row dots and the
    add in one batched (1 x r) @ (r x 1) product per row; k = 1e-12 + m / n in one ``addcmul``; B' = k B written
    straight in ``dtype`` (s rides in the GEMMs' alpha). Each of these small ops costs host time on a GPU step (a
    hundred layers), so the count is kept low. With ``triton`` (opt-in, ``dora_triton``) everything after the two
    small GEMMs is one Triton launch and B' = s k B.

    |k| is kept >= ~1e-12 by adding 1e-12 (k moves by 1e-12, invisible next to any k above ~3e-5 in float32, and
    the output by at most 1e-12 |z|, the bound of the reference's floor), so y / k is z. The square root is not
    clamped: a negative n^2 only arises for a row of W + s B A that is 0 to rounding, whose k is meaningless anyway.
    """
    acc = wsq.dtype
    a32 = lora_a if lora_a.dtype == acc else lora_a.to(acc)
    at = cast_at(lora_a, a32, dtype)
    wa = projection(weight, at, acc)  # (out, in) @ (in, r) -> (out, r)
    gram = a32 @ a32.t()  # (r, r) A A^T
    if triton:
        from .dora_triton import triton_factors

        k_col, _, inv_col, kb = triton_factors(wa, lora_b, gram, wsq, magnitude, scaling, _K_FLOOR, dtype)
        return DoraFactors(k_col, inv_col, at, kb, 1.0)
    b32 = lora_b if lora_b.dtype == acc else lora_b.to(acc)
    k_col, inv, kb = norm_tail(wa, b32, gram, wsq, magnitude, scaling, dtype, with_inverse)
    return DoraFactors(k_col, inv, at, kb, scaling)


def cast_at(lora_a: torch.Tensor, a32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A^T (in, r) in the activation dtype; inside a model call from its batched casts (``factor_casts``)."""
    if a32.dtype == dtype:
        return a32.t()
    batch = factor_casts.current()
    if batch is not None and lora_a.dtype == a32.dtype:
        return batch.cast(lora_a, dtype).t()
    return a32.t().to(dtype)


def norm_tail(
    wa: torch.Tensor,
    b32: torch.Tensor,
    gram: torch.Tensor,
    wsq: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    dtype: torch.dtype,
    with_inverse: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(k_col, inv, kb) from W A^T, B, A A^T, ||W||^2 and m, for one layer or a stack of L same-shape layers.

    Args:
        wa: (out, r) or (L, out, r); b32: like wa; gram: (r, r) or (L, r, r); wsq, magnitude: (out,) or (L, out)
    Returns:
        k_col (..., out, 1), inv (..., out) or None, kb = k B (..., out, r) in ``dtype``
    """
    acc, rank = wsq.dtype, b32.shape[-1]
    product = torch.baddbmm if b32.dim() == 3 else torch.addmm
    t = product(wa, b32, gram, alpha=0.5 * scaling)  # W A^T + (s/2) B (A A^T): (..., out, r)
    # ||W_o||^2 + 2 s <B_o, T_o>: one (1 x r) @ (r x 1) product per row, added to ||W||^2 in the same launch
    n2 = torch.baddbmm(wsq.reshape(-1, 1, 1), b32.reshape(-1, 1, rank), t.reshape(-1, rank, 1), alpha=2.0 * scaling)
    rn = n2.view(wsq.shape).rsqrt_()  # 1 / n
    k = torch.addcmul(cached_scalar(_K_FLOOR, acc, rn.device), magnitude, rn)  # 1e-12 + m / n
    inv = rn.div_(k) if with_inverse else None  # 1 / (k n)
    k_col = k.unsqueeze(-1)  # (..., out, 1)
    if dtype == acc:
        kb = b32 * k_col
    else:  # float32 product, rounded once into the activation dtype
        kb = torch.mul(b32, k_col, out=torch.empty(b32.shape, dtype=dtype, device=b32.device))
    return k_col, inv, kb


def scaled_weight(weight: torch.Tensor, k_col: torch.Tensor) -> torch.Tensor:
    """W' = k W (out, in) in W's dtype, the product taken in k's (float32) precision and rounded once.

    Args:
        weight: (out, in); k_col: (out, 1)
    """
    if weight.dtype == k_col.dtype:
        return weight * k_col
    return torch.mul(weight, k_col, out=torch.empty_like(weight))


def _forward_2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, f: DoraFactors
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, hs, W'): y = kb_scale * hs B'^T (+ b), then the base GEMM with W' = k W (out, in) accumulates onto it;
    hs = x A^T (N, r)."""
    hs = x @ f.at  # (N, in) @ (in, r) -> (N, r)
    kbt = f.kb.t()
    # (N, r) @ (r, out) -> (N, out), the scale in the GEMM's alpha
    out = torch.addmm(bias, hs, kbt, alpha=f.kb_scale) if bias is not None else scaled_mm(hs, kbt, f.kb_scale)
    wk = scaled_weight(weight, f.k_col)
    return out.addmm_(x, wk.t()), hs, wk  # + (N, in) @ (in, out)


def dora_linear_inference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    wsq: torch.Tensor,
    factors: DoraFactors | None = None,
) -> torch.Tensor:
    """The fused forward without autograd bookkeeping. Shapes as ``fused_dora_linear``."""
    shape = x.shape
    x2 = x if x.dim() == 2 else x.reshape(-1, shape[-1])
    if factors is None:
        triton = use_triton(x) and wsq.dtype == torch.float32
        factors = dora_factors(weight, wsq, lora_a, lora_b, magnitude, scaling, x.dtype, triton=triton)
    out, _, _ = _forward_2d(x2, weight, bias, factors)
    return as_output(out, shape[:-1])


class FusedDoraLinear(torch.autograd.Function):
    """One autograd node for a DoRA Linear; see the module docstring for the math and what is saved."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        magnitude: torch.Tensor,
        scaling: float,
        wsq: torch.Tensor,
        factors: DoraFactors | None = None,
    ) -> torch.Tensor:
        need_dx, _, _, need_da, need_db, need_dm = ctx.needs_input_grad[:6]
        shape = x.shape
        if x.dim() != 2:  # flattened here, not by the caller: no view nodes in the graph
            x = x.reshape(-1, shape[-1])
        triton = factors is None and use_triton(x) and wsq.dtype == torch.float32
        f = factors  # given: computed with every same-shape layer of the model call (``dora_batch``)
        if f is None or (need_dm and f.inv is None):
            f = dora_factors(
                weight, wsq, lora_a, lora_b, magnitude, scaling, x.dtype, with_inverse=need_dm, triton=triton
            )
        out, hs, wk = _forward_2d(x, weight, bias, f)
        out = as_output(out, shape[:-1])  # (..., out), not a view: the caller may edit it in place
        ctx.shape, ctx.dtypes = shape, (lora_a.dtype, lora_b.dtype, magnitude.dtype, magnitude.shape)
        ctx.bias_dtype, ctx.scaling, ctx.kb_scale = (None if bias is None else bias.dtype), scaling, f.kb_scale
        ctx.triton_grad = need_dm and wsq.dtype == torch.float32 and use_triton_grad(x, weight.shape[0])
        # dm reads y; if the caller edits it in place, backward forms it again from x, W, b and the factors
        ctx.save_for_backward(
            x if (need_da or need_dm) else None,
            wk if need_dx else None,
            bias if need_dm else None,
            f.at if (need_dx or need_dm) else None,
            f.kb if (need_dx or need_da or need_dm) else None,
            hs if need_db else None,
            keep_output(ctx, out) if need_dm else None,
            f.k_col if (need_db or need_dm) else None,
            f.inv if need_dm else None,
            weight if need_dm else None,
        )
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, wk, bias, at, kb, hs, y, k_col, inv, weight = ctx.saved_tensors
        need_dx, _, need_dbias, need_da, need_db, need_dm = ctx.needs_input_grad[:6]
        a_dtype, b_dtype, m_dtype, m_shape = ctx.dtypes
        g = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()  # (N, out)
        acc = accumulation_dtype(g.dtype)
        if need_dm:  # the output as the forward made it, (N, out)
            y = _output_2d(ctx, y, x, weight, bias, DoraFactors(k_col, inv, at, kb, ctx.kb_scale))
        dx = dbias = da = db = dm = None
        gkb = g @ kb if (need_dx or need_da) else None  # (N, out) @ (out, r) -> (N, r): (k g) B, over kb_scale / s
        if need_dx:
            dx = scaled_mm(gkb, at.t(), ctx.kb_scale)  # (N, r) @ (r, in) -> (N, in): s (k g) B A
            dx.addmm_(g, wk)  # + g (k W): the base backward GEMM accumulates onto it
            dx = dx.view(ctx.shape)
        if need_da:
            da = weight_grad(gkb, x, a_dtype, ctx.kb_scale)  # (r, N) @ (N, in) -> (r, in)
        if need_db:
            db = weight_grad(g, hs, acc, ctx.scaling).mul_(k_col)  # (out, N) @ (N, r) -> (out, r), times s k
            db = db if db.dtype == b_dtype else db.to(b_dtype)
        if need_dm and ctx.triton_grad:  # one read of g and y (dora_triton.triton_magnitude_grad)
            from .dora_triton import triton_magnitude_grad

            dm, dbias = triton_magnitude_grad(g, y, bias, inv, need_dbias)
            dm = dm if dm.shape == m_shape else dm.view(m_shape)
            dm = dm if dm.dtype == m_dtype else dm.to(m_dtype)
            dbias = None if dbias is None else dbias.to(ctx.bias_dtype)
            return dx, None, dbias, da, db, dm, None, None, None
        gsum = g.sum(0, dtype=acc) if (need_dbias or (need_dm and bias is not None)) else None
        if need_dm:
            total = (g * y).sum(0, dtype=acc)  # sum_N g y = k sum_N g z + b sum_N g
            if bias is not None:
                total.addcmul_(gsum, bias, value=-1.0)
            dm = total.mul_(inv)  # / (k n)
            dm = dm if dm.shape == m_shape else dm.view(m_shape)
            dm = dm if dm.dtype == m_dtype else dm.to(m_dtype)
        if need_dbias:
            dbias = gsum.to(ctx.bias_dtype)
        return dx, None, dbias, da, db, dm, None, None, None


def _output_2d(
    ctx: Any,
    saved: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    f: DoraFactors,
) -> torch.Tensor:
    """y (N, out) as the forward returned it: the kept output, or, when the caller edited it in place, formed again
    by the forward's own ops (the same numbers)."""
    y = kept_output(ctx, saved)
    if y is None:
        y, _, _ = _forward_2d(x, weight, bias, f)
    return y if y.dim() == 2 else y.view(-1, y.shape[-1])


def fused_dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    wsq: torch.Tensor | None = None,
    factors: DoraFactors | None = None,
) -> torch.Tensor:
    """y = b + (m / ||W + s B A||) (W + s B A) x, in x's dtype; gradients for x, A, B, m and b as they require.

    Args:
        x: (..., in); weight: (out, in) frozen, in x's dtype; bias: (out,) or None
        lora_a: (r, in); lora_b: (out, r); magnitude: (out,) (any float dtypes, e.g. float32 masters)
        wsq: (out,) ||W_o||^2 in the accumulation dtype (computed when None)
        factors: k, 1 / (k n), A^T and B' already computed from these same tensors (``dora_batch``), or None
    Returns:
        (..., out) in x's dtype
    """
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "fused_dora_linear takes a frozen base weight; this one requires grad (use the layer's reference path)."
        )
    if wsq is None:
        wsq = row_squares(weight, accumulation_dtype(x.dtype))
    graph = torch.is_grad_enabled() and (
        x.requires_grad
        or lora_a.requires_grad
        or lora_b.requires_grad
        or magnitude.requires_grad
        or (bias is not None and bias.requires_grad)
    )
    if graph:
        return FusedDoraLinear.apply(x, weight, bias, lora_a, lora_b, magnitude, scaling, wsq, factors)
    return dora_linear_inference(x, weight, bias, lora_a, lora_b, magnitude, scaling, wsq, factors)
