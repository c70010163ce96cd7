"""Reference forward of one LoRA layer for a mixed-adapter batch: one pass per adapter over its rows."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .routing import BASE_ADAPTER, BatchRouting

if TYPE_CHECKING:
    from .layers.base import LoraLayer


def mixed_forward(layer: LoraLayer, x: torch.Tensor, routing: BatchRouting, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Base output for every row, plus each row's own adapter term. Rows are the first dimension of ``x``.

    Args:
        x: (B, ...) input of the layer, B == len(routing.adapter_names)
    Returns:
        (B, ...) output of the layer
    """
    if layer.merged:
        raise ValueError("Cannot run a mixed-adapter batch while adapters are merged; call unmerge_adapter() first.")
    result = layer.base_layer(x, *args, **kwargs)
    if x.shape[0] != len(routing.adapter_names):
        raise ValueError(f"adapter_names has {len(routing.adapter_names)} entries but the batch has {x.shape[0]} rows.")
    for name, rows in routing.groups_on(x.device).items():
        record = layer.adapters.get(name)
        if name == BASE_ADAPTER or record is None:
            continue  # the adapter does not target this layer: base output for these rows
        if record.variant is not None:
            raise ValueError(
                f"Adapter {name!r} uses {record.variant.name}, which mixed-adapter batches do not support."
            )
        term = layer._lora_term(name, x.index_select(0, rows)).to(result.dtype)
        result = result.index_add(0, rows, term)
    return result
