"""Mixed-adapter batches with plain torch ops: each row gathers its adapter from the stack, then two batched matmuls.

The vectorised CPU path, and the CUDA path where Triton is missing or slower (punica's BGMV/SGMV, arXiv:2310.18547,
expressed as gather + bmm): no Python loop over adapters, the rank-r work batched over rows. Rows are sequences,
so the gathered weights ((rows, R, in) + (rows, out, R)) are small next to the activations (rows, L, in).
"""

from __future__ import annotations

import torch


def reference_gathered_lora(
    x: torch.Tensor, stack_a: torch.Tensor, stack_b: torch.Tensor, slots: torch.Tensor
) -> torch.Tensor:
    """Row by row: z[i] = x[i] A[slots[i]]^T B[slots[i]]^T. The readable definition the fast paths must match.

    Args:
        x: (rows, L, in); stack_a: (S, R, in); stack_b: (S, out, R) (scaling folded in); slots: (rows,) long
    Returns:
        (rows, L, out) in x's dtype
    """
    out = [x[i] @ stack_a[s].T @ stack_b[s].T for i, s in enumerate(slots.tolist())]
    return torch.stack(out) if out else x.new_zeros(0, x.shape[1], stack_b.shape[1])


def gather_factors(
    stack_a: torch.Tensor, stack_b: torch.Tensor, slots: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's factors: ((rows, R, in), (rows, out, R))."""
    return stack_a.index_select(0, slots), stack_b.index_select(0, slots)


def gathered_lora(
    x: torch.Tensor, a_rows: torch.Tensor, b_rows: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """z = x A_row^T B_row^T (+ bias) for every row at once.

    Args:
        x: (rows, L, in); a_rows: (rows, R, in); b_rows: (rows, out, R); bias: (out,) or None
    Returns:
        (rows, L, out) in x's dtype
    """
    h = torch.bmm(x, a_rows.transpose(1, 2))  # (rows, L, in) @ (rows, in, R) -> (rows, L, R)
    if bias is not None:
        return torch.baddbmm(bias, h, b_rows.transpose(1, 2))
    return torch.bmm(h, b_rows.transpose(1, 2))  # (rows, L, R) @ (rows, R, out) -> (rows, L, out)
