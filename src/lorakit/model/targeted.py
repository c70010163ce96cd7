"""The names PEFT exposes as ``targeted_module_names`` / ``targeted_parameter_names``, read from the live model.

Module names are paths inside the user's model (``model.layers.0.self_attn.q_proj``); parameter names are the
targeted parameter's path with wrapper levels removed (``model.layers.0.mlp.experts.gate_up_proj``).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..layers import LoraLayer
from ..layers.param_wrapper import ParamWrapper


def _strip_base_layers(path: str) -> str:
    return ".".join(part for part in path.split(".") if part != "base_layer")


def targeted_module_names(layers: Iterable[tuple[str, LoraLayer]]) -> list[str]:
    """Paths of the modules LoRA wraps (parameter wrappers excluded), in model order, without duplicates."""
    names = [_strip_base_layers(n) for n, layer in layers if not isinstance(layer, ParamWrapper)]
    return list(dict.fromkeys(names))


def targeted_parameter_names(layers: Iterable[tuple[str, LoraLayer]]) -> list[str]:
    """``module.parameter`` paths of the parameters LoRA adapts through ``target_parameters``."""
    names = [
        f"{_strip_base_layers(n)}.{layer.parameter_name}" for n, layer in layers if isinstance(layer, ParamWrapper)
    ]
    return list(dict.fromkeys(names))
