"""OLoRA (arXiv:2406.01775): orthonormal B from the QR decomposition of W.

Q, R = qr(W) with W (out, in) in float32; B = Q[:, :r] (out, r), A = R[:r] (r, in); W <- W - s * B @ A.
Quantised layers dequantise in ``base_weight_2d`` and re-quantise in ``write_base_weight_2d``.

Only the leading blocks of the QR are used, and Householder QR builds its first r reflectors from W's first r
columns alone, so Q[:, :r] and R[:r, :r] are the thin QR of W[:, :r] (an (out, r) factorisation) and
R[:r, r:] = Q[:, :r]^T W[:, r:] (one GEMM). Same algorithm and sign convention as the full QR, a fraction of the
work; the values agree with the full QR's to rounding (see ``leading_qr``).
"""

from __future__ import annotations

import torch

from .registry import InitRequest, InitResult, register_init
from .residual import matrix_weight, require_rank_fits, with_residual


def leading_qr(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``rank`` columns of Q and rows of R of ``torch.linalg.qr(weight)``, without the full QR.

    Args:
        weight: (out, in), rank <= min(out, in)
    Returns:
        Q_r (out, rank) with orthonormal columns, R_r (rank, in) upper trapezoidal, Q_r @ R_r = W's rank-r part
    """
    q_r, r_head = torch.linalg.qr(weight[:, :rank])  # (out, r), (r, r): the full QR's first r reflectors
    r_tail = q_r.T @ weight[:, rank:]  # (r, out) @ (out, in - r) -> (r, in - r), equals R[:r, r:] since Q^T W = R
    return q_r, torch.cat([r_head, r_tail], dim=1)


@register_init("olora")
def init_olora(req: InitRequest) -> InitResult:
    weight = matrix_weight(req, "olora")
    require_rank_fits(req, weight, "olora")
    q_r, r_r = leading_qr(weight, req.rank)  # (out, r), (r, in)
    return with_residual(weight, r_r, q_r, req.scaling)
