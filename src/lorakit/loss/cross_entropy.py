"""Summed cross-entropy of float32 logits together with its gradient, without autograd.

For logits z (C, V) and targets t (C,): with lse_i = log sum_v exp(z_iv),

    L = sum_i (lse_i - z_{i,t_i}),        dL/dz_iv = exp(z_iv - lse_i) - [v == t_i]

(softmax minus one-hot). Autograd's ``F.cross_entropy`` reaches the same numbers through ``log_softmax``, the
NLL and both backwards: three more passes over a (C, V) buffer and one more buffer, which is what a large
vocabulary costs. ``F.cross_entropy(z, t, reduction="sum")`` and its gradient are the reference (tests/loss).
"""

from __future__ import annotations

import torch


def check_targets(targets: torch.Tensor, vocab_size: int) -> None:
    """Targets (already without ignored ones) must index the vocabulary; one error names the first bad one."""
    bad = (targets < 0) | (targets >= vocab_size)
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(f"label {value} is outside the vocabulary (0..{vocab_size - 1}) and is not ignore_index.")


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(C, V) float32, (C,) int64 -> 0-dim summed cross-entropy."""
    lse = torch.logsumexp(logits, dim=1)  # (C,)
    return (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum()


def cross_entropy_sum_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, V) float32, (C,) int64 -> (0-dim summed cross-entropy, dL/dlogits (C, V))."""
    lse = torch.logsumexp(logits, dim=1, keepdim=True)  # (C, 1)
    loss = (lse.squeeze(1) - logits.gather(1, targets[:, None]).squeeze(1)).sum()
    grad = torch.sub(logits, lse).exp_()  # softmax, (C, V)
    grad.scatter_add_(1, targets[:, None], grad.new_full((targets.numel(), 1), -1.0))
    return loss, grad
