"""layer_replication: stack copies of transformer layers that share their base weights (e.g. [[0, 4], [2, 6]]).

Copies share the original Parameters (buffers are copied) so only LoRA weights differ per position.
"""

from __future__ import annotations

import copy

import torch.nn as nn

_LAYER_LISTS = ("model.layers", "model.decoder.layers", "bert.encoder.layer", "encoder.layer", "transformer.h", "h")


def _find_layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    for path in _LAYER_LISTS:
        parent_path, _, attr = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
        except AttributeError:
            continue
        layers = getattr(parent, attr, None)
        if isinstance(layers, nn.ModuleList):
            return parent, attr, layers
    raise ValueError(
        f"layer_replication needs a list of layers at one of {', '.join(_LAYER_LISTS)}; none found in "
        f"{type(model).__name__}."
    )


def _shared_copy(layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` whose parameters are the original Parameter objects (buffers are copied)."""
    memo = {id(p): p for p in layer.parameters()}
    return copy.deepcopy(layer, memo)


def replicate_layers(model: nn.Module, ranges: list[list[int]]) -> None:
    """Rebuild the layer list from [start, end) ranges, sharing base weights; updates num_hidden_layers."""
    parent, attr, layers = _find_layer_list(model)
    n = len(layers)
    bad = [r for r in ranges if r[1] > n]
    if bad:
        raise ValueError(f"layer_replication ranges {bad} exceed the model's {n} layers.")
    new_layers: list[nn.Module] = []
    for start, end in ranges:
        for i in range(start, end):
            layer = _shared_copy(layers[i])
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = len(new_layers)
            new_layers.append(layer)
    setattr(parent, attr, nn.ModuleList(new_layers))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = len(new_layers)
    if config is not None and getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for s, e in ranges for i in range(s, e)]
