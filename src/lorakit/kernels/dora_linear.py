"""Fused DoRA linear: y = b + k (x W^T + s (x A^T) B^T), k = m / ||W + s B A||_row, one node in the activation dtype.

DoRA (arXiv:2402.09353), the norm detached (section 4.3). The reference is ``variants/dora.py`` (base output, then
``DoraLinearFunction``); this node covers the common case of one active DoRA adapter on a plain ``nn.Linear``
without dropout (or in eval mode) and differs only in where the work happens, as ``lora_linear.FusedLoraLinear``:

* the norm by the expanded square, with few small ops: ||W_o||^2 is cached for the frozen W (``weight_sq``), then
  T = W A^T + (s/2) B (A A^T) (one read of W, an (out, r) result) and n^2 = ||W||^2 + 2 s <B_o, T_o>;
* k goes into the weights, not onto the output: W' = k W (out, in) and B' = s k B (out, r) are formed with float32
  math and rounded once to the activation dtype, then ``out = hs B'^T (+ b)`` and ``out.addmm_(x, W'^T)`` with
  hs = x A^T (N, r). The output is rounded once, so a k within half an ulp of 1 still acts (rounding z = W x + ...
  first and scaling it afterwards would lose it), and the weight-sized pass for W' costs less than an output-sized
  one (out * in < N * out once N > in). No (N, out) float32 tensor is ever made.
* backward, derived by hand, for g = dL/dy (N, out):

      dx = (g B') A + g W'                 (W' formed again: nothing weight-sized is kept)
      dA = (g B')^T x                      (``weight_grad``: chunked on CUDA)
      dB = s k * (g^T hs)
      dm = sum_N(g * (y - b)) / (k n)      (= sum_N(g z) / n; |k| floored at 1e-12 so the division is exact)
      db = sum_N(g)                        (only when the bias is trainable)

  Saved: x, hs, the cast A, B', y (the output itself: the next layer usually keeps it anyway) and (out,) vectors.
  (So an in-place op on the output, e.g. ReLU(inplace=True), makes backward raise autograd's in-place error, as the
  reference path's ``DoraLinearFunction`` did.)
* on CUDA with Triton (``dora_triton``), the small steps run as two kernels: the norm's tail and the factors in one
  launch, and dm in one read of g and y; opt-in (``LORAKIT_DORA_TRITON=1``): the torch ops measured faster on a
  host-bound step.

Shapes: x (N, in) (the node flattens (..., in) itself), W (out, in), b (out,), A (r, in), B (out, r), m (out,).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from . import factor_casts
from .dora_triton import use_triton
from .lora_linear import weight_grad

_K_FLOOR = 1e-12  # |k| floor: y / k must give z back for the magnitude's gradient (as variants/dora_autograd.py)


_ACCUMULATION = {torch.bfloat16: torch.float32, torch.float16: torch.float32, torch.float32: torch.float32}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 activations (a dict lookup: ``torch.promote_types`` is a dispatched op)."""
    return _ACCUMULATION.get(dtype, torch.float64)


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
    with torch.no_grad():
        sq = torch.linalg.vector_norm(weight.detach(), dim=1, dtype=acc).square_()
    state["_lorakit_dora_wsq"] = (weakref.ref(weight), key, sq)
    return sq


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """k = m / ||W + s B A|| per output row (|k| >= 1e-12) and the factors the GEMMs use. No autograd.

    Args:
        weight: (out, in) in ``dtype``; wsq: (out,) ||W_o||^2 in the accumulation dtype
        lora_a: (r, in); lora_b: (out, r); magnitude: (out,) (any float dtypes)
    Returns:
        k (out, 1) and s k (out, 1) in the accumulation dtype, 1 / (k n) (out,) (None unless ``with_inverse``;
        (out, 1), always, with ``triton``), A^T (in, r) and B' = s k B (out, r) in ``dtype``

    With ``triton`` (CUDA, float32 accumulation) everything after the two small GEMMs is one Triton launch
    (``dora_triton.triton_factors``), the same float32 math.

    |k| is kept >= ~1e-12 by adding 1e-12 (one op; k moves by 1e-12, invisible next to any k above ~3e-5 in float32,
    and the output by at most 1e-12 |z|, the bound of the reference's floor), so y / k is z. The square root is not
    clamped: a negative n^2 only arises for a row of W + s B A that is 0 to rounding, whose k is meaningless anyway.
    """
    acc = wsq.dtype
    a32 = lora_a if lora_a.dtype == acc else lora_a.to(acc)
    at32 = a32.t()  # (in, r)
    batch = factor_casts.current()  # inside a model call: A was cast with every other factor in one copy
    if dtype == acc:
        at = at32
    elif batch is not None and lora_a.dtype == acc:
        at = batch.cast(lora_a, dtype).t()
    else:
        at = at32.to(dtype)
    wa = weight @ at  # (out, in) @ (in, r) -> (out, r): one read of W, float32 accumulation
    if triton:
        from .dora_triton import triton_factors

        k_col, ks_col, inv_col, kb = triton_factors(wa, lora_b, a32 @ at32, wsq, magnitude, scaling, _K_FLOOR, dtype)
        return k_col, ks_col, inv_col, at, kb
    b32 = lora_b if lora_b.dtype == acc else lora_b.to(acc)
    if wa.dtype != acc:
        wa = wa.to(acc)
    t = torch.addmm(wa, b32, a32 @ at32, alpha=0.5 * scaling)  # W A^T + (s/2) B (A A^T): (out, r)
    rn = torch.add(wsq, torch.linalg.vecdot(b32, t), alpha=2.0 * scaling).rsqrt_()  # 1 / n: (out,)
    k = torch.mul(magnitude, rn).add_(_K_FLOOR)  # (out,)
    inv = rn.div_(k) if with_inverse else None  # 1 / (k n)
    k_col = k.unsqueeze(1)  # (out, 1)
    ks_col = k_col * scaling
    kb = b32 * ks_col  # (out, r): s k B
    return k_col, ks_col, inv, at, kb if dtype == acc else kb.to(dtype)


def scaled_weight(weight: torch.Tensor, k_col: torch.Tensor) -> torch.Tensor:
    """W' = k W (out, in) in W's dtype, the product taken in k's (float32) precision and rounded once.

    Args:
        weight: (out, in); k_col: (out, 1)
    """
    if weight.dtype == k_col.dtype:
        return weight * k_col
    return torch.mul(weight, k_col, out=torch.empty_like(weight))


def _forward_2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    at: torch.Tensor,
    kb: torch.Tensor,
    k: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, hs): y = hs B'^T (+ b), then the base GEMM with W' = k W accumulates onto it; hs = x A^T (N, r)."""
    hs = x @ at  # (N, in) @ (in, r) -> (N, r)
    kbt = kb.t()
    out = torch.addmm(bias, hs, kbt) if bias is not None else hs @ kbt  # (N, r) @ (r, out) -> (N, out)
    return out.addmm_(x, scaled_weight(weight, k).t()), hs  # + (N, in) @ (in, out)


def dora_linear_inference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    wsq: torch.Tensor,
) -> torch.Tensor:
    """The fused forward without autograd bookkeeping. Shapes as ``fused_dora_linear``."""
    shape = x.shape
    x2 = x if x.dim() == 2 else x.reshape(-1, shape[-1])
    triton = use_triton(x) and wsq.dtype == torch.float32
    k_col, _, _, at, kb = dora_factors(weight, wsq, lora_a, lora_b, magnitude, scaling, x.dtype, triton=triton)
    out, _ = _forward_2d(x2, weight, bias, at, kb, k_col)
    return out if len(shape) == 2 else out.view(*shape[:-1], out.shape[-1])


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
    ) -> torch.Tensor:
        need_dx, _, _, need_da, need_db, need_dm = ctx.needs_input_grad[:6]
        shape = x.shape
        if x.dim() != 2:  # flattened here, not by the caller: no view nodes in the graph
            x = x.reshape(-1, shape[-1])
        triton = use_triton(x) and wsq.dtype == torch.float32
        k_col, ks_col, inv, at, kb = dora_factors(
            weight, wsq, lora_a, lora_b, magnitude, scaling, x.dtype, with_inverse=need_dm, triton=triton
        )
        out, hs = _forward_2d(x, weight, bias, at, kb, k_col)
        ctx.shape, ctx.dtypes = shape, (lora_a.dtype, lora_b.dtype, magnitude.dtype, magnitude.shape)
        ctx.bias_dtype, ctx.triton = (None if bias is None else bias.dtype), triton
        ctx.save_for_backward(
            x if need_da else None,
            weight if need_dx else None,
            bias if need_dm else None,
            at if need_dx else None,
            kb if (need_dx or need_da) else None,
            hs if need_db else None,
            out if need_dm else None,
            k_col if need_dx else None,
            ks_col if need_db else None,
            inv if need_dm else None,
        )
        return out if len(shape) == 2 else out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        x, weight, bias, at, kb, hs, y, k_col, ks_col, inv = ctx.saved_tensors
        need_dx, _, need_dbias, need_da, need_db, need_dm = ctx.needs_input_grad[:6]
        a_dtype, b_dtype, m_dtype, m_shape = ctx.dtypes
        g = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()  # (N, out)
        acc = accumulation_dtype(g.dtype)
        dx = dbias = da = db = dm = None
        gks = g @ kb if (need_dx or need_da) else None  # (N, out) @ (out, r) -> (N, r): s (k g) B
        if need_dx:
            dx = gks @ at.t()  # (N, r) @ (r, in) -> (N, in)
            dx.addmm_(g, scaled_weight(weight, k_col))  # + (k g) W: the base backward GEMM accumulates onto it
            dx = dx.view(ctx.shape)
        if need_da:
            da = weight_grad(gks, x, a_dtype)  # (r, N) @ (N, in) -> (r, in)
        if need_db:
            db = weight_grad(g, hs, acc).mul_(ks_col)  # (out, N) @ (N, r) -> (out, r), times s k
            db = db if db.dtype == b_dtype else db.to(b_dtype)
        if need_dm and ctx.triton:  # one read of g and y (dora_triton.triton_magnitude_grad)
            from .dora_triton import triton_magnitude_grad

            dm, dbias = triton_magnitude_grad(g, y, bias, inv, need_dbias)
            dm = dm if dm.shape == m_shape else dm.view(m_shape)
            dm = dm if dm.dtype == m_dtype else dm.to(m_dtype)
            dbias = None if dbias is None else dbias.to(ctx.bias_dtype)
            return dx, None, dbias, da, db, dm, None, None
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
        return dx, None, dbias, da, db, dm, None, None


def fused_dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    wsq: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = b + (m / ||W + s B A||) (W + s B A) x, in x's dtype; gradients for x, A, B, m and b as they require.

    Args:
        x: (..., in); weight: (out, in) frozen, in x's dtype; bias: (out,) or None
        lora_a: (r, in); lora_b: (out, r); magnitude: (out,) (any float dtypes, e.g. float32 masters)
        wsq: (out,) ||W_o||^2 in the accumulation dtype (computed when None)
    Returns:
        (..., out) in x's dtype
    """
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "fused_dora_linear takes a frozen base weight; this one requires grad (use the layer's reference path)."
        )
    if wsq is None:
        wsq = torch.linalg.vector_norm(weight.detach(), dim=1, dtype=accumulation_dtype(x.dtype)).square()
    graph = torch.is_grad_enabled() and (
        x.requires_grad
        or lora_a.requires_grad
        or lora_b.requires_grad
        or magnitude.requires_grad
        or (bias is not None and bias.requires_grad)
    )
    if graph:
        return FusedDoraLinear.apply(x, weight, bias, lora_a, lora_b, magnitude, scaling, wsq)
    return dora_linear_inference(x, weight, bias, lora_a, lora_b, magnitude, scaling, wsq)
