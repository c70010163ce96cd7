"""Orthogonal init (PEFT's "orthogonal"; https://datta0.github.io/posts/rethink-lora-init/): A and B are both
non-zero, yet B @ A = 0 because they are built from complementary rows of one random orthogonal matrix.

Q = qr(randn(r, r)).Q; A = (randn(in, r/2) @ Q[0::2]).T / 10 (r, in); B = randn(r/2, out).T @ Q[1::2] / 10
(out, r). B @ A = G_B Q[1::2] Q[0::2]^T G_A^T = 0 since distinct rows of Q are orthogonal. r must be even.
Draws come from ``req.generator`` (torch's global generator when None, in PEFT's order).
"""

from __future__ import annotations

import torch

from .registry import InitRequest, InitResult, register_init


@register_init("orthogonal")
def init_orthogonal(req: InitRequest) -> InitResult:
    rank = req.rank
    if rank % 2:
        raise ValueError(
            f"init_lora_weights='orthogonal' needs an even rank, got r={rank} for layer {req.module_name!r}."
        )
    (_, in_features), (out_features, b_cols) = req.a_shape, req.b_shape
    if b_cols != rank:
        raise ValueError(
            f"init_lora_weights='orthogonal' needs B of shape (out, r); layer {req.module_name!r} "
            f"({req.layer_kind}) has B {req.b_shape} (a grouped conv). Use another init for this layer."
        )
    gen = req.generator
    q, _ = torch.linalg.qr(torch.randn(rank, rank, generator=gen))
    lora_a = torch.randn(in_features, rank // 2, generator=gen).mm(q[0::2]).T / 10.0  # (r, in)
    lora_b = torch.randn(rank // 2, out_features, generator=gen).T.mm(q[1::2]) / 10.0  # (out, r)
    return InitResult(lora_a.contiguous(), lora_b.contiguous())
