"""LoRA over bases whose product another library computes (bitsandbytes' 4-bit and 8-bit linears, QLoRA
arXiv:2305.14314): one autograd node for a group of layers that read the same input (q/k/v, gate/up); a single
layer is a group of one.

The base stays opaque: each member brings a ``QuantisedBase`` that computes its product the library's own way (its
kernel, its compute-dtype casts and bias, called without autograd inside the node) and adds dY W to dX the way the
library's own backward does (bitsandbytes dequantises the frozen weight per call; nothing dense is kept from forward
to backward). The low-rank part is what ``FusedLoraLinear`` / ``SharedInputLora`` compute, in x's dtype (factors
cast, never x). With A = [A_1; ...; A_m] (R x in), h = dropout(x) A^T (N x R, one GEMM; h_i its column slices) and
G = [s_1 dY_1 B_1, ..., s_m dY_m B_m] (N x R):

    forward    y_i = base_i(x), then += s_i h_i B_i^T in place (scale in the GEMM's alpha, add in its beta)
    dX         = (G A) * mask / (1 - p) + sum_i dY_i W_i          (each base accumulates its own term onto dX)
    dA         = G^T dropout(x)                                   (one weight gradient for every A; dA_i its rows)
    dB_i       = s_i dY_i^T h_i

Against the reference (base output, then a separate term s * B A x, its scale pass and an add; 4-bit in peft also
clones the base output) this saves per layer two passes over the output forward, the scale pass and the dX add
backward, and for a group m - 1 GEMMs for h and for dX's low-rank part. Dropout (p > 0) only for a group of one
(each layer draws its own mask); the node then keeps dropout(x) for dA and the bool mask for dX (peft's layers keep
dropout(x) and a float mask). The base bias gets no gradient (callers check it is frozen), nor does the quantised
weight (bitsandbytes' own backward gives it none either).

Shapes: x (N, in) (or (..., in), flattened here), A_i (r_i, in), B_i (out_i, r_i), mask (N, in) bool.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from . import factor_casts
from .lora_linear import scaled_mm, weight_grad
from .node_output import as_output
from .shared_input_linear import _in_dtype


class QuantisedBase(Protocol):
    """A frozen base the node cannot compute itself; the layer type supplies it (``layers/bnb_products.py``)."""

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """The base output, as the base layer's forward computes it, freshly allocated. x: (N, in) -> (N, out),
        in x's dtype. Called with autograd off."""
        ...

    def add_input_grad(self, dy: torch.Tensor, dx: torch.Tensor) -> None:
        """dx += dY W in place, as the library's backward forms dY W. dy: (N, out); dx: (N, in), x's dtype."""
        ...


def reference_quantised_lora(
    x: torch.Tensor,
    base: torch.nn.Module,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_mask: torch.Tensor | None = None,
    p: float = 0.0,
) -> torch.Tensor:
    """The readable formula: the base module's own (autograd) output plus s * B A dropout(x) in x's dtype.

    Args:
        x: (N, in); base: the quantised module; lora_a: (r, in); lora_b: (out, r); dropout_mask: (N, in) bool
    Returns:
        (N, out) in x's dtype
    """
    xd = x if dropout_mask is None else x * dropout_mask / (1.0 - p)
    # (N, in) @ (in, r) -> (N, r) @ (r, out) -> (N, out)
    return base(x) + (xd @ lora_a.to(x.dtype).t() @ lora_b.to(x.dtype).t()) * scaling


def _columns(t: torch.Tensor, ranks: list[int]) -> tuple[torch.Tensor, ...]:
    """Each member's column block of t (N, R): one split call, none for a group of one (host time per layer)."""
    return (t,) if len(ranks) == 1 else t.split(ranks, dim=1)


def _outputs(
    x2: torch.Tensor, xd: torch.Tensor, bases, a_cat: torch.Tensor, bs, scalings, ranks
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """h = dropout(x) A^T (N, R) and every member's (N, out_i) output: its base product with s_i h_i B_i^T added."""
    h = xd @ a_cat.t()  # (N, in) @ (in, R): one read of x for every member
    outs = []
    for base, b, scaling, h_i in zip(bases, bs, scalings, _columns(h, ranks)):
        out = base.product(x2)  # (N, out_i), fresh: the low-rank part is accumulated onto it
        outs.append(out.addmm_(h_i, b.t(), alpha=scaling))  # + s_i (N, r_i) @ (r_i, out_i)
    return h, outs


class QuantisedLora(torch.autograd.Function):
    """The group node; see the module docstring. ``factors`` holds (A_i, B_i) for each member."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bases: tuple, scalings: tuple[float, ...], p: float, *factors):
        shape = x.shape
        x2 = x if x.dim() == 2 else x.reshape(-1, shape[-1])  # (N, in)
        lora_as, lora_bs = factors[0::2], factors[1::2]
        batch = factor_casts.current()
        a_cat = [_in_dtype(a, x.dtype, batch) for a in lora_as]
        a_cat = a_cat[0] if len(a_cat) == 1 else torch.cat(a_cat)  # (R, in)
        bs = [_in_dtype(b, x.dtype, batch) for b in lora_bs]  # (out_i, r_i)
        ranks = [a.shape[0] for a in lora_as]
        xd, mask = (x2, None) if p == 0.0 else torch.native_dropout(x2, p, True)
        h, outs = _outputs(x2, xd, bases, a_cat, bs, scalings, ranks)
        needs = ctx.needs_input_grad
        need_dx, need_da, need_db = needs[0], any(needs[4::2]), any(needs[5::2])
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no GEMMs for it
        ctx.bases, ctx.scalings, ctx.ranks, ctx.p, ctx.shape = bases, scalings, ranks, p, shape
        ctx.dtypes = [(a.dtype, b.dtype) for a, b in zip(lora_as, lora_bs)]
        ctx.save_for_backward(
            xd if need_da else None,  # dropout(x) as drawn (x itself without dropout): dA's right factor
            mask if need_dx else None,  # bool (N, in), for dX only
            a_cat if need_dx else None,
            h if need_db else None,
            *(bs if (need_dx or need_da) else [None] * len(bs)),
        )
        return tuple(as_output(out, shape[:-1]) for out in outs)  # (..., out_i), not views

    @staticmethod
    def backward(ctx: Any, *grad_outs: torch.Tensor | None):
        xd, mask, a_cat, h, *bs = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_dx, need_da = needs[0], any(needs[4::2])
        keep = 1.0 / (1.0 - ctx.p)  # dropout's rescaling of the kept entries
        dys = [None if g is None else g.reshape(-1, g.shape[-1]).contiguous() for g in grad_outs]  # (N, out_i)
        first = next(dy for dy in dys if dy is not None)
        g = None
        if need_dx or need_da:  # G (N, R): one scaled GEMM per used member, zeros for an unused output
            blocks = [
                first.new_zeros((first.shape[0], r)) if dy is None else scaled_mm(dy, b, s)
                for dy, b, s, r in zip(dys, bs, ctx.scalings, ctx.ranks)
            ]
            g = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
        dx = None
        if need_dx:
            dx = g @ a_cat if mask is None else scaled_mm(g, a_cat, keep).mul_(mask)  # (N, R) @ (R, in)
            for base, dy in zip(ctx.bases, dys):
                if dy is not None:
                    base.add_input_grad(dy, dx)  # + dY_i W_i, the weight dequantised by the base
            dx = dx.view(ctx.shape)
        das = [None] * len(dys)
        if need_da:
            da_all = weight_grad(g, xd, torch.float32)  # (R, N) @ (N, in) -> (R, in)
            das = (da_all,) if len(dys) == 1 else da_all.split(ctx.ranks)
        hs = _columns(h, ctx.ranks) if h is not None else [None] * len(dys)  # (N, r_i) views
        grads: list[torch.Tensor | None] = []
        for i, (dy, (a_dtype, b_dtype)) in enumerate(zip(dys, ctx.dtypes)):
            da = das[i] if needs[4 + 2 * i] and dy is not None else None  # an unused output: no gradient
            db = None
            if needs[5 + 2 * i] and dy is not None:
                db = weight_grad(dy, hs[i], b_dtype, ctx.scalings[i], strided=True)  # (out_i, N) @ (N, r_i)
            grads += [da if da is None or da.dtype == a_dtype else da.to(a_dtype), db]
        return dx, None, None, None, *grads


Member = tuple[QuantisedBase, torch.Tensor, torch.Tensor, float]  # (base, A, B, s)


def quantised_lora(x: torch.Tensor, members: list[Member], p: float = 0.0) -> tuple[torch.Tensor, ...]:
    """y_i = base_i(x) + s_i B_i A_i dropout_p(x) for every member (base, lora_a, lora_b, scaling), one node.

    Args:
        x: (..., in); members: A_i (r_i, in), B_i (out_i, r_i) (any float dtype); p: dropout (one member only)
    Returns:
        one (..., out_i) tensor per member, in x's dtype
    """
    if p > 0.0 and len(members) != 1:
        raise ValueError(f"dropout draws one mask per layer: a group of {len(members)} layers needs p = 0")
    factors: list[torch.Tensor] = []
    for _, lora_a, lora_b, _ in members:
        factors += [lora_a, lora_b]
    bases = tuple(m[0] for m in members)
    return QuantisedLora.apply(x, bases, tuple(float(m[3]) for m in members), float(p), *factors)


def quantised_lora_inference(
    x: torch.Tensor, members: list[Member], a_cat: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """``quantised_lora`` without autograd bookkeeping (no dropout); factors already in x's dtype, ``a_cat`` their
    A's concatenated (R, in) if the caller has it. Shapes as there."""
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if a_cat is None:
        a_cat = members[0][1] if len(members) == 1 else torch.cat([m[1] for m in members])
    ranks = [m[1].shape[0] for m in members]
    _, outs = _outputs(x2, x2, [m[0] for m in members], a_cat, [m[2] for m in members], [m[3] for m in members], ranks)
    return tuple(as_output(out, x.shape[:-1]) for out in outs)
