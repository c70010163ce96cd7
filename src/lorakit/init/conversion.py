"""Converting a PiSSA / OLoRA / CorDA adapter into a plain LoRA adapter for the original, unmodified base model.

These inits move s * B0 @ A0 out of the base weight (W_res = W - s B0 A0). After training to (A, B) the model is
W_res + s B A = W + s (B A - B0 A0) = W + s [B, -B0] @ [A; A0], i.e. a rank-2r LoRA adapter on W with
A' = [A; A0] (2r, in), B' = [B, -B0] (out, 2r). Saved with r' = 2r and alpha' = 2 alpha (scaling unchanged), or
alpha' = sqrt(2) alpha with rsLoRA (alpha / sqrt(r) unchanged); rank/alpha patterns double.
``save_pretrained(dir, path_initial_model_for_weight_conversion=init_dir)`` reads A0, B0 from the adapter that was
saved right after initialisation, before training.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from typing import Any

import torch

CONVERTIBLE_PREFIXES = ("pissa", "olora", "corda", "true")
_A_KEY = re.compile(r"\.(lora_A\.weight|lora_embedding_A)$")
_B_KEY = re.compile(r"\.(lora_B\.weight|lora_embedding_B)$")


def converted_state_dicts(
    peft_model,
    path_initial_model: str,
    selected_adapters: list[str] | None,
    save_embedding_layers: bool | str,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    """({adapter: disk-format tensors of the rank-2r adapter}, {adapter: adapter_config.json overrides})."""
    from ..io.checkpoint import read_adapter_weights
    from ..io.state_dict import PREFIX, adapter_state_dict

    names = list(peft_model.peft_config) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in peft_model.peft_config]
    if unknown:
        raise ValueError(
            f"selected_adapters {unknown} do not exist; existing adapters: {sorted(peft_model.peft_config)}."
        )
    saved = read_adapter_weights(path_initial_model)
    _warn_quantised_pissa(peft_model, str(path_initial_model))
    initial = {(k if k.startswith(PREFIX) else PREFIX + k): v for k, v in saved.items()}
    state_dicts, overrides = {}, {}
    for name in names:
        config = peft_model.peft_config[name]
        overrides[name] = converted_config(config, name)
        current = adapter_state_dict(peft_model, name, config, save_embedding_layers)
        current = restore_saved_base_weights(peft_model, name, current, initial)
        state_dicts[name] = concat_with_initial(current, initial, str(path_initial_model))
    return state_dicts, overrides


def _warn_quantised_pissa(peft_model, path_initial_model: str) -> None:
    """PEFT's note (same condition: the initial adapter's folder is named pissa*, the model holds non-float
    parameters): the converted LoRA reproduces the fine-tuned model only up to quantisation error."""
    if not os.path.basename(os.path.normpath(path_initial_model)).startswith("pissa"):
        return
    if any(p.dtype not in (torch.float32, torch.float16, torch.bfloat16) for p in peft_model.parameters()):
        warnings.warn(
            r"Note that Quant(W_res) + AB != Quant(W) + \Delta(AB); the converted LoRA, when combined with W or "
            "Quant(W), may introduce a certain gap in the fine-tuned model. Therefore, we recommend directly using "
            "the Quant(W_res) in conjunction with the PiSSA adapter.",
            stacklevel=4,
        )


def converted_config(config, adapter_name: str) -> dict[str, Any]:
    """Config fields of the rank-2r adapter. Raises where the conversion cannot keep the scaling."""
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError(
            "path_initial_model_for_weight_conversion cannot convert an adapter that uses use_rslora=True together "
            f"with rank_pattern/alpha_pattern (adapter {adapter_name!r}): the doubled ranks would change the scaling."
        )
    if config.use_dora:
        raise ValueError(
            f"path_initial_model_for_weight_conversion cannot convert DoRA adapter {adapter_name!r}: its magnitude "
            "vector is tied to the residual base weight."
        )
    if not str(config.init_lora_weights).lower().startswith(CONVERTIBLE_PREFIXES):
        warnings.warn(
            f"path_initial_model_for_weight_conversion converts PiSSA/OLoRA/CorDA adapters; adapter {adapter_name!r} "
            f"uses init_lora_weights={config.init_lora_weights!r}, which does not change the base weights.",
            stacklevel=4,
        )
    alpha_factor = math.sqrt(2) if config.use_rslora else 2
    return {
        "r": 2 * config.r,
        "lora_alpha": config.lora_alpha * alpha_factor,
        "rank_pattern": {k: 2 * v for k, v in config.rank_pattern.items()},
        "alpha_pattern": {k: 2 * v for k, v in config.alpha_pattern.items()},
        "init_lora_weights": True,
    }


def restore_saved_base_weights(
    peft_model, adapter_name: str, current: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Full base weights saved with the adapter (embeddings under save_embedding_layers) hold W_res; the converted
    adapter works on W, so they become W_res + s * B0 @ A0 (in the layer's own layout)."""
    from ..delta import delta_matrix
    from ..io.state_dict import PREFIX

    base = peft_model.get_base_model()
    out = dict(current)
    for key, weight in current.items():
        if not (key.startswith(PREFIX) and key.endswith(".base_layer.weight")):
            continue
        path = key[len(PREFIX) : -len(".base_layer.weight")]
        layer = base.get_submodule(path)
        a0, b0 = _initial_factors(initial, PREFIX + path)
        if a0 is None or adapter_name not in getattr(layer, "adapters", {}):
            continue
        scaling = layer.adapters[adapter_name].base_scaling
        delta = layer._weight_from_2d(delta_matrix(a0.reshape(a0.shape[0], -1), b0.reshape(b0.shape[0], -1), scaling))
        out[key] = (weight.float() + delta.to(weight.device)).to(weight.dtype)
    return out


def _initial_factors(
    initial: dict[str, torch.Tensor], module_key: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    for a_name, b_name in (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B")):
        if f"{module_key}.{a_name}" in initial:
            return initial[f"{module_key}.{a_name}"], initial[f"{module_key}.{b_name}"]
    return None, None


def concat_with_initial(
    current: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """A' = [A; A0] (rows), B' = [B, -B0] (columns); every other tensor (biases, saved modules) passes through."""
    out = {}
    for key, tensor in current.items():
        is_a, is_b = _A_KEY.search(key) is not None, _B_KEY.search(key) is not None
        if not (is_a or is_b):
            out[key] = tensor
            continue
        start = initial.get(key)
        if start is None:
            raise ValueError(f"The initial adapter at {source!r} has no tensor {key!r}; was it saved from this model?")
        if start.shape != tensor.shape:
            raise ValueError(
                f"The initial adapter at {source!r} has {key!r} of shape {tuple(start.shape)}, the trained adapter "
                f"{tuple(tensor.shape)}; they must come from the same config."
            )
        start = start.to(device=tensor.device, dtype=tensor.dtype)
        out[key] = torch.cat([tensor, start], dim=0) if is_a else torch.cat([tensor, -start], dim=1)
    return out
