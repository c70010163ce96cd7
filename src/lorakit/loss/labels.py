"""Targets of a causal-LM loss, as transformers' ``ForCausalLMLoss`` builds them.

Tokens < n predict n: ``labels`` (B, T) are padded on the right with ``ignore_index`` and shifted left by one, so
position t is scored against label t+1 and the last position against nothing. A caller that has already shifted
(sequence parallelism, packed batches) passes ``shift_labels`` (B, T) instead, used as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_targets(
    labels: torch.Tensor | None,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    device: torch.device | None = None,
) -> torch.Tensor:
    """(B, T) labels -> (B * T,) int64 targets aligned with the (B * T) hidden rows."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("The fused loss needs `labels` or `shift_labels`; neither was given.")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1).to(device=device, dtype=torch.long)


def loss_denominator(
    targets: torch.Tensor, ignore_index: int, num_items_in_batch: torch.Tensor | int | None
) -> torch.Tensor | int | float:
    """What the summed loss is divided by: the count of non-ignored targets ("mean"), or ``num_items_in_batch``
    (gradient accumulation: the count over all micro-batches of the optimizer step), moved to the targets' device."""
    if num_items_in_batch is None:
        return (targets != ignore_index).sum().to(torch.float32)
    if torch.is_tensor(num_items_in_batch):
        return num_items_in_batch.to(targets.device)
    return num_items_in_batch
