"""One autograd node for the LoRA Linears that read the same input (q/k/v, gate/up): their rank-r work shared.

Each member i computes what ``FusedLoraLinear`` computes for it, y_i = x W_i^T + b_i + s_i * B_i A_i x (no dropout),
in the activation dtype; what the node shares is everything that touches x or dX once for all members. With
A = [A_1; ...; A_m] (R x in, R = sum r_i), h = x A^T (N x R, one GEMM; h_i its column slices) and, in backward,
G = [s_1 dY_1 B_1, ..., s_m dY_m B_m] (N x R, one GEMM per member and one small concatenation):

    forward    y_i = s_i h_i B_i^T (+ b_i), then x W_i^T accumulated onto it      (1 + 2m GEMMs; m nodes -> 1)
    dX         = G A + sum_i dY_i W_i                                           (1 + m GEMMs, no adds between nodes)
    dA         = G^T x  (R x in; dA_i its row blocks)                           (one weight gradient for all A's)
    dB_i       = s_i dY_i^T h_i

The per-layer nodes would run m GEMMs for h, m for dX's low-rank part, m weight-gradient reductions for the A's,
and autograd would add the m partial dX's: per block of a Llama (q/k/v and gate/up) about 13 launches and 3 autograd
nodes fewer, which is host time on a GPU step (``docs/benchmarks.md``). Outputs a member's caller never uses get no
gradient (None), and their blocks of G are zero.

Shapes: x (N, in) (or (..., in), flattened here), W_i (out_i, in), b_i (out_i,), A_i (r_i, in), B_i (out_i, r_i).
"""

from __future__ import annotations

from typing import Any

import torch

from . import factor_casts
from .lora_linear import _lora_plus_base, scaled_mm, weight_grad
from .node_output import as_output

PER_MEMBER = 4  # (weight, bias, lora_a, lora_b) per member in the node's flat argument list


def _in_dtype(param: torch.Tensor, dtype: torch.dtype, batch: factor_casts.FactorCasts | None) -> torch.Tensor:
    """``param`` in the activation dtype: itself, the model call's batched cast, or a cast of its own."""
    if param.dtype == dtype:
        return param
    return batch.cast(param, dtype) if batch is not None else param.detach().to(dtype)


Member = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, float]  # (W, b, A, B, s)


def _member_outputs(shape: torch.Size, x2: torch.Tensor, h: torch.Tensor, weights, biases, bs, scalings) -> list:
    """y_i = s_i h_i B_i^T (+ b_i) + x W_i^T for each member, h_i the member's columns of h (N, R); (..., out_i)."""
    outs = []
    hs = h.split([b.shape[1] for b in bs], dim=1)  # one call for every member's (N, r_i) view
    for weight, bias, b, scaling, h_i in zip(weights, biases, bs, scalings, hs):
        out = _lora_plus_base(x2, weight, bias, h_i, b, scaling)  # (N, out_i)
        outs.append(as_output(out, shape[:-1]))  # not a view: a caller may edit it in place
    return outs


class SharedInputLora(torch.autograd.Function):
    """The group node; see the module docstring. ``params`` holds (W_i, b_i, A_i, B_i) for each member."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scalings: tuple[float, ...], *params: torch.Tensor | None):
        needs = ctx.needs_input_grad
        shape = x.shape
        x2 = x if x.dim() == 2 else x.reshape(-1, shape[-1])  # (N, in)
        weights, biases = params[0::PER_MEMBER], params[1::PER_MEMBER]
        lora_as, lora_bs = params[2::PER_MEMBER], params[3::PER_MEMBER]
        batch = factor_casts.current()
        a_cat = torch.cat([_in_dtype(a, x.dtype, batch) for a in lora_as])  # (R, in)
        bs = [_in_dtype(b, x.dtype, batch) for b in lora_bs]  # (out_i, r_i) each
        ranks = [a.shape[0] for a in lora_as]
        h = x2 @ a_cat.t()  # (N, R): one read of x for every member
        outs = _member_outputs(shape, x2, h, weights, biases, bs, scalings)
        member_needs = [needs[2 + PER_MEMBER * i : 2 + PER_MEMBER * (i + 1)] for i in range(len(ranks))]
        need_dx, need_da = needs[0], any(n[2] for n in member_needs)
        need_x = need_da or any(n[0] for n in member_needs)
        ctx.scalings, ctx.ranks, ctx.shape, ctx.member_needs = scalings, ranks, shape, member_needs
        ctx.dtypes = [(a.dtype, b.dtype) for a, b in zip(lora_as, lora_bs)]
        ctx.save_for_backward(
            x2 if need_x else None,
            a_cat if need_dx else None,
            h if any(n[3] for n in member_needs) else None,
            *(bs if (need_dx or need_da) else [None] * len(bs)),
            *(weights if need_dx else [None] * len(weights)),
        )
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grad_outs: torch.Tensor | None):
        saved = ctx.saved_tensors
        m = len(ctx.ranks)
        x2, a_cat, h = saved[:3]
        bs, weights = saved[3 : 3 + m], saved[3 + m : 3 + 2 * m]
        need_dx = ctx.needs_input_grad[0]
        need_da = any(n[2] for n in ctx.member_needs)
        dys = [None if g is None else g.reshape(-1, g.shape[-1]).contiguous() for g in grad_outs]  # (N, out_i)
        first = next(dy for dy in dys if dy is not None)
        g = None
        if need_dx or need_da:
            # G = [s_1 dY_1 B_1, ...] (N, R): one scaled GEMM per member, zeros for an unused output, one concat
            blocks = [
                first.new_zeros((first.shape[0], r)) if dy is None else scaled_mm(dy, b, s)
                for dy, b, s, r in zip(dys, bs, ctx.scalings, ctx.ranks)
            ]
            g = torch.cat(blocks, dim=1)
        dx = None
        if need_dx:
            dx = g @ a_cat  # (N, R) @ (R, in): every member's low-rank part at once
            for dy, weight in zip(dys, weights):
                if dy is not None:
                    dx.addmm_(dy, weight)  # + dY_i W_i
            dx = dx.view(ctx.shape)
        # (R, N) @ (N, in) -> (R, in) in float32, then each member's (r_i, in) row block (one split call each)
        das = weight_grad(g, x2, torch.float32).split(ctx.ranks) if need_da else [None] * m
        hs = h.split(ctx.ranks, dim=1) if h is not None else [None] * m  # (N, r_i) views
        grads: list[torch.Tensor | None] = []
        for i, (dy, (need_w, need_bias, need_a, need_b)) in enumerate(zip(dys, ctx.member_needs)):
            a_dtype, b_dtype = ctx.dtypes[i]
            dw = weight_grad(dy, x2, x2.dtype) if need_w and dy is not None else None
            dbias = dy.sum(0) if need_bias and dy is not None else None
            da_i = das[i] if need_a else None
            if da_i is not None and da_i.dtype != a_dtype:
                da_i = da_i.to(a_dtype)
            db = None
            if need_b and dy is not None:
                db = weight_grad(dy, hs[i], b_dtype, ctx.scalings[i], strided=True)  # (out_i, N) @ (N, r_i)
            grads += [dw, dbias, da_i, db]
        return dx, None, *grads


def shared_input_lora(x: torch.Tensor, members: list[Member]) -> tuple[torch.Tensor, ...]:
    """y_i = x W_i^T + b_i + s_i B_i A_i x for every member (weight, bias, lora_a, lora_b, scaling), one node.

    Args:
        x: (..., in); members: W_i (out_i, in), b_i (out_i,) or None, A_i (r_i, in), B_i (out_i, r_i), s_i
    Returns:
        one (..., out_i) tensor per member, in x's dtype
    """
    params: list[torch.Tensor | None] = []
    for weight, bias, lora_a, lora_b, _ in members:
        params += [weight, bias, lora_a, lora_b]
    return SharedInputLora.apply(x, tuple(float(m[4]) for m in members), *params)


def shared_input_inference(
    x: torch.Tensor, members: list[Member], a_cat: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """``shared_input_lora`` without autograd (inference; factors already in x's dtype), same shapes; ``a_cat``:
    the members' A concatenated (R, in) when the caller keeps it."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (N, in)
    a_cat = torch.cat([m[2] for m in members]) if a_cat is None else a_cat
    h = x2 @ a_cat.t()  # (N, R)
    weights, biases, _, bs, scalings = zip(*members)
    return tuple(_member_outputs(x.shape, x2, h, weights, biases, bs, scalings))
