"""OLoRA (arXiv:2406.01775): orthonormal B from the QR decomposition of W.

Q, R = qr(W) with W (out, in) in float32; B = Q[:, :r] (out, r), A = R[:r] (r, in); W <- W - s * B @ A.
Quantised layers dequantise in ``base_weight_2d`` and re-quantise in ``write_base_weight_2d``.
"""

from __future__ import annotations

import torch

from .registry import InitRequest, InitResult, register_init
from .residual import matrix_weight, require_rank_fits, with_residual


@register_init("olora")
def init_olora(req: InitRequest) -> InitResult:
    weight = matrix_weight(req, "olora")
    require_rank_fits(req, weight, "olora")
    q, r_mat = torch.linalg.qr(weight)  # (out, k), (k, in)
    r = req.rank
    return with_residual(weight, r_mat[:r], q[:, :r], req.scaling)
