"""Reference forward of one LoRA layer for a mixed-adapter batch: one pass per adapter over its rows.

y[i] = base(x)[i] + s_a * B_a A_a dropout(x[i])   with a = adapter_names[i]; rows named ``__base__`` or whose adapter
does not target this layer get the base output only. This is the semantics every fast path in ``lorakit.kernels``
must reproduce; ``mixed_forward`` is the single entry point LoRA layers call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .kernels.mixed_dispatch import fast_mixed_forward, planned_fast_lane, planned_for
from .routing import BASE_ADAPTER, BatchRouting

if TYPE_CHECKING:
    from .layers.base import LoraLayer
    from .peft_model import PeftModel


def check_mixed_supported(layer: LoraLayer, routing: BatchRouting) -> None:
    """Raise if this layer cannot route ``routing``: merged adapters, or an adapter with a variant (e.g. DoRA)."""
    if layer.merged:
        raise ValueError(
            f"Cannot run a mixed-adapter batch while adapters {layer.merged_adapters} are merged; call "
            "unmerge_adapter() first."
        )
    for name in routing.groups:
        record = layer.adapters.get(name)
        if record is not None and record.variant is not None and not _variant_routable(record.variant):
            raise ValueError(
                f"Adapter {name!r} uses {record.variant.name}, which mixed-adapter batches do not support; run it "
                "in its own batch with set_adapter()."
            )


def _variant_routable(variant: Any) -> bool:
    """Variants opt in to mixed batches with ``supports_mixed_batch = True``: their ``forward`` must then be correct
    on any subset of rows (it receives only its rows of x and of the output so far)."""
    return bool(getattr(variant, "supports_mixed_batch", False))


def mixed_forward(layer: LoraLayer, x: torch.Tensor, routing: BatchRouting, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Entry point: the vectorised path of ``lorakit.kernels`` where it applies (same semantics, no loop over
    adapters), else ``reference_mixed_forward``. Shapes as there."""
    routing = routing.for_batch(x.shape[0])
    if not args and not kwargs:
        fast = planned_fast_lane(layer, x, routing)  # decode steps of one generate(): the plan is already checked
        if fast is not None:
            return fast
    if not planned_for(layer, routing):
        check_mixed_supported(layer, routing)
    fast = fast_mixed_forward(layer, x, routing, args, kwargs)
    return fast if fast is not None else reference_mixed_forward(layer, x, routing, *args, **kwargs)


def reference_mixed_forward(
    layer: LoraLayer, x: torch.Tensor, routing: BatchRouting, *args: Any, **kwargs: Any
) -> torch.Tensor:
    """Base output for every row, plus each row's own adapter term. Rows are the first dimension of ``x``.

    Args:
        layer: the LoRA layer (its base layer computes the shared part)
        x: (B, ...) input of the layer; B == len(routing), or a multiple of it for a generation routing
        routing: the batch's row -> adapter assignment
        args, kwargs: passed on to the base layer
    Returns:
        (B, ...) output of the layer, in the base output's dtype
    """
    routing = routing.for_batch(x.shape[0])
    check_mixed_supported(layer, routing)
    result = layer.base_layer(x, *args, **kwargs)
    for name, rows in routing.groups_on(x.device).items():
        if name == BASE_ADAPTER or name not in layer.adapters:
            continue  # base rows, or an adapter that does not target this layer
        x_rows = x.index_select(0, rows)  # (n, ...) rows of this adapter
        variant = layer.adapters[name].variant
        if variant is not None:
            result = result.index_copy(0, rows, variant.forward(layer, name, x_rows, result.index_select(0, rows)))
            continue
        # (n, ...) additive term, scattered back into its rows
        result = result.index_add(0, rows, layer._lora_term(name, x_rows).to(result.dtype))
    return result


def check_adapter_names(model: PeftModel, adapter_names: Any, batch_size: int | None) -> list[str]:
    """Validate ``adapter_names`` of a mixed batch against the model; returns them as a list.

    Raises TypeError for anything but a list/tuple of strings, and ValueError in training mode, for unknown names
    (never treated as base), for a length other than ``batch_size`` (when known), with merged adapters, or for DoRA
    adapters.
    """
    if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of adapter names (str), one per row; got {adapter_names!r}.")
    names = list(adapter_names)
    if model.training:
        raise ValueError("adapter_names (mixed-adapter batches) only work in eval mode; call model.eval() first.")
    unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in model.peft_config})
    if unknown:
        raise ValueError(
            f"adapter_names contains unknown adapters {unknown}; existing adapters: {sorted(model.peft_config)} "
            f"(use {BASE_ADAPTER!r} for rows that should use the base model)."
        )
    if batch_size is not None and len(names) != batch_size:
        raise ValueError(
            f"adapter_names has {len(names)} entries but the batch has {batch_size} rows; give one name per row."
        )
    merged = [f"{path} ({layer.merged_adapters})" for path, layer in model.base_model.lora_layers() if layer.merged]
    if merged:
        raise ValueError(
            f"Cannot use adapter_names while adapters are merged (in {len(merged)} layers, e.g. {merged[0]}); call "
            "unmerge_adapter() first."
        )
    dora = sorted({n for n in names if n in model.peft_config and model.peft_config[n].use_dora})
    if dora:
        raise ValueError(f"Mixed-adapter batches do not support DoRA adapters; got {dora}. Run them in own batches.")
    return names


def batch_size_of(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """Rows of a model call: the first dim of the first tensor among positional args and the usual input kwargs."""
    keys = ("input_ids", "inputs", "inputs_embeds", "pixel_values", "input_features", "x")
    for value in (*args, *(kwargs.get(k) for k in keys)):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None
