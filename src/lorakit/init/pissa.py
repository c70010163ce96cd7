"""PiSSA (arXiv:2404.02948): the adapter starts as the principal singular components of W, the base keeps the rest.

W = U S Vh (float32). With S_r = S[:r] / s: A = diag(sqrt(S_r)) Vh[:r] (r, in), B = U[:, :r] diag(sqrt(S_r))
(out, r), W <- W - s * B @ A. ``pissa_niter_K`` replaces the full SVD by ``torch.svd_lowrank(W, q=r, niter=K)``
(randomised, K subspace iterations; draws from torch's global generator, as PEFT does).
"""

from __future__ import annotations

import torch

from .registry import InitRequest, InitResult, register_init
from .residual import matrix_weight, require_float_base, require_rank_fits, split_singular_values, with_residual


@register_init("pissa")
def init_pissa(req: InitRequest) -> InitResult:
    """Full SVD of the (out, in) base weight; the top r components go into A and B."""
    require_float_base(req, "pissa")
    weight = matrix_weight(req, "pissa")
    require_rank_fits(req, weight, "pissa")
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)  # (out, k), (k,), (k, in)
    r = req.rank
    lora_a, lora_b = split_singular_values(u[:, :r], s[:r], vh[:r], req.scaling)
    return with_residual(weight, lora_a, lora_b, req.scaling)


@register_init("pissa_niter", pattern=r"pissa_niter_\d+")
def init_pissa_fast(req: InitRequest) -> InitResult:
    """Randomised low-rank SVD with K subspace iterations (``pissa_niter_K``); much faster on large weights."""
    niter = req.config.pissa_niter()
    require_float_base(req, req.config.init_lora_weights)
    weight = matrix_weight(req, req.config.init_lora_weights)
    require_rank_fits(req, weight, req.config.init_lora_weights)
    u, s, v = torch.svd_lowrank(weight, q=req.rank, niter=niter)  # (out, r), (r,), (in, r)
    lora_a, lora_b = split_singular_values(u, s, v.T, req.scaling)
    return with_residual(weight, lora_a, lora_b, req.scaling)
