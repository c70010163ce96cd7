"""Liger Kernel's fused linear cross-entropy (Triton, CUDA) for a plain ``nn.Linear`` head: an optional extra.

Liger's kernel takes the head as a weight (and bias), so it serves the heads that are exactly an ``nn.Linear``
(an untargeted ``lm_head``, tied or not); a LoRA-targeted head or any other module uses ``chunked.py``. The logits
map becomes Liger's arguments: a softcap is its ``softcap``; a multiplier or divisor scales the hidden states
first (``(s h) W^T = s (h W^T)``, equal up to rounding). ``liger-kernel`` is imported only when this path is asked
for on CUDA; ``import lorakit`` never needs it.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn as nn

from .heads import LogitsMap


@functools.cache
def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available()


def liger_applies(head: nn.Module, hidden: torch.Tensor) -> bool:
    """Liger can compute this loss: a plain Linear head, CUDA tensors, the package installed."""
    return type(head) is nn.Linear and hidden.is_cuda and liger_available()


def liger_linear_cross_entropy(
    head: nn.Linear,
    logits_map: LogitsMap,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    denominator: torch.Tensor | float,
) -> torch.Tensor:
    """Same contract as ``chunked_linear_cross_entropy``: (N, H), (N,) -> 0-dim summed CE / ``denominator``."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    scale = 1.0 if logits_map.multiply is None else logits_map.multiply
    if logits_map.divide is not None:
        scale = scale / logits_map.divide
    if scale != 1.0:
        hidden = hidden * scale
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="sum", softcap=logits_map.softcap)
    loss = loss_fn(head.weight, hidden, targets, head.bias)
    if isinstance(loss, tuple):  # versions that also return the z-loss
        loss = loss[0]
    return loss.float() / denominator
