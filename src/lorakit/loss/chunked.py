"""Exact linear cross-entropy in chunks of tokens: the full (tokens x vocabulary) logits never exist.

For hidden states ``h`` (N, H), a head ``f`` (any module: a Linear, its LoRA layer, tied embeddings, ...), an
element-wise logits map ``m`` (scale, softcap) and targets ``t`` (N,), the loss is

    L = sum_i CE(m(f(h_i)).float(), t_i) / D

over the rows whose target is not ``ignore_index`` (rows with an ignored target contribute neither loss nor
gradient, so they are skipped), with D the number of those rows ("mean") or ``num_items_in_batch``.

The gradients are made during the forward, chunk by chunk: each chunk's logits (C, V) are built under autograd,
its summed loss is differentiated with respect to the chunk's hidden rows and the head's trainable parameters,
and the logits are freed before the next chunk. The forward thus costs what the ordinary path's forward plus
backward cost for the head (one (C, H) x (H, V) product each way), and keeps only ``dL/dh`` (N, H) and the
parameter gradients; the backward scales them by the incoming gradient. Exactness: the same operations as the
ordinary path on each row, summed in a different order (float32 relative error ~1e-7).

Dropout inside the head (``lora_dropout`` on a targeted ``lm_head``) draws its masks per chunk: the same
distribution as the ordinary path, other draws.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from .cross_entropy import cross_entropy_sum, cross_entropy_sum_and_grad

DEFAULT_LOGITS_BUDGET = 1 << 24  # elements of one chunk's logits (64 MiB in float32): rows = budget // vocabulary


@dataclass
class ChunkedHead:
    """The head side of one loss: ``head`` (H -> V), ``logits_map`` (N, V) -> (N, V), ``rows`` per chunk."""

    head: nn.Module
    logits_map: Callable[[torch.Tensor], torch.Tensor]
    rows: int
    ignore_index: int = -100

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(C, H) -> (C, V) float32 logits, under the caller's grad mode (as the model upcasts them for its loss)."""
        return self.logits_map(self.head(hidden)).float()


def chunk_rows(vocab_size: int, chunk_size: int | None, budget: int = DEFAULT_LOGITS_BUDGET) -> int:
    """Tokens per chunk: ``chunk_size`` if given, else as many as keep one chunk's logits within ``budget``."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}.")
        return chunk_size
    return max(1, budget // max(1, vocab_size))


def _valid_rows(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (targets != ignore_index).nonzero().squeeze(1)


def _summed_loss_and_grads(
    plan: ChunkedHead, hidden: torch.Tensor, targets: torch.Tensor, params: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """Summed loss, d(sum)/dh (N, H) and d(sum)/dparams, one chunk of rows at a time."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.zeros_like(hidden)
    grad_p: list[torch.Tensor | None] = [None] * len(params)
    for rows in _valid_rows(targets, plan.ignore_index).split(plan.rows):
        h = hidden.index_select(0, rows).detach().requires_grad_(True)  # (C, H)
        with torch.enable_grad():
            logits = plan.logits(h)  # (C, V), a graph back to h and the head's parameters
        chunk_targets = targets.index_select(0, rows).to(logits.device)  # a head on another device (device_map)
        loss, grad_logits = cross_entropy_sum_and_grad(logits.detach(), chunk_targets)
        grads = torch.autograd.grad(logits, [h, *params], grad_outputs=grad_logits, allow_unused=True)
        del logits, grad_logits
        grad_h.index_copy_(0, rows, grads[0])
        for i, g in enumerate(grads[1:]):
            if g is not None:
                grad_p[i] = g if grad_p[i] is None else grad_p[i].add_(g)
        total += loss.to(total.device)
    return total, grad_h, grad_p


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """loss = sum CE / D; the gradients are computed in ``forward`` and scaled by the incoming one in ``backward``."""

    @staticmethod
    def forward(ctx, hidden, targets, denominator, plan, *params):
        total, grad_h, grad_p = _summed_loss_and_grads(plan, hidden, targets, params)
        ctx.grad_h = grad_h.div_(denominator)
        ctx.grad_p = [None if g is None else g.div_(denominator) for g in grad_p]
        return total / denominator

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h = ctx.grad_h * grad_loss.to(ctx.grad_h.dtype)
        grad_p = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.grad_p]
        ctx.grad_h = ctx.grad_p = None
        return grad_h, None, None, None, *grad_p


def chunked_linear_cross_entropy(
    plan: ChunkedHead, hidden: torch.Tensor, targets: torch.Tensor, denominator: torch.Tensor | float
) -> torch.Tensor:
    """Summed cross-entropy of ``plan.logits_map(plan.head(hidden))`` against ``targets``, divided by
    ``denominator`` (``labels.loss_denominator``: the non-ignored count, or ``num_items_in_batch``).

    hidden: (N, H); targets: (N,) int64. Returns a 0-dim float32 tensor whose backward reaches ``hidden`` and the
    head's parameters that require grad.
    """
    params = [p for p in plan.head.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (hidden.requires_grad or params):
        return _ChunkedLinearCrossEntropy.apply(hidden, targets, denominator, plan, *params)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for rows in _valid_rows(targets, plan.ignore_index).split(plan.rows):
        logits = plan.logits(hidden.index_select(0, rows))
        total += cross_entropy_sum(logits, targets.index_select(0, rows).to(logits.device)).to(total.device)
    return total / denominator
