"""Runtime helpers PEFT users reach for, under PEFT's names (``peft.helpers``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.nn as nn

from .layers import LoraLayer


def _lora_layers(model: nn.Module) -> list[LoraLayer]:
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers, so there is no adapter scale to change.")
    merged = [layer for layer in layers if layer.merged]
    if merged:
        raise ValueError(
            f"{len(merged)} LoRA layers have merged adapters (e.g. {merged[0].merged_adapters}); the merged weights "
            "used the old scale and unmerging would subtract the new one. Call unmerge_adapter() first."
        )
    return layers


@contextlib.contextmanager
def rescale_adapter_scale(model: nn.Module, multiplier: float) -> Iterator[None]:
    """Multiply the scaling of every adapter of every LoRA layer by ``multiplier`` inside the block; the previous
    scales come back on exit, also on exceptions. With ``multiplier`` in [0, 1] this is WiSE-FT's interpolation
    between base and fine-tuned weights (arXiv:2109.01903)."""
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)):
        raise TypeError(f"multiplier must be a float or int, got {type(multiplier).__name__}.")
    saved = [(record, record.scale) for layer in _lora_layers(model) for record in layer.adapters.values()]
    try:
        for record, scale in saved:
            record.scale = scale * multiplier
            record.sync_scaling()  # a pinned scaling tensor (compiled hotswap) is what forward reads
        yield
    finally:
        for record, scale in saved:
            record.scale = scale
            record.sync_scaling()


def set_adapter_scale(model: nn.Module, adapter_name: str, scale: float) -> None:
    """Set ``adapter_name``'s scaling to ``scale`` times its configured value (alpha / r) on every layer."""
    layers = _lora_layers(model)
    if not any(adapter_name in layer.adapters for layer in layers):
        existing = sorted({n for layer in layers for n in layer.adapters})
        raise ValueError(f"Adapter {adapter_name!r} is on no LoRA layer; existing adapters: {existing}.")
    for layer in layers:
        layer.set_scale(adapter_name, scale)
