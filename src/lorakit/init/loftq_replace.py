"""``replace_lora_weights_loftq``: LoftQ (arXiv:2310.08659) for a model that is already quantised to 4 bits.

One LoftQ step per layer, without re-quantising: the original weights W are read lazily, one tensor at a time, from
the model's safetensors files (single or sharded), and the rank-r SVD of W - dequant(Wq) sets A and B as in
``lorakit.init.loftq`` (no division by the scaling). A callback may reject a layer, which restores its factors.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from ..io.hub import resolve_file
from ..layers import LoraLayer
from ..layers.bnb import Linear4bit, import_bitsandbytes
from .loftq import low_rank_fit

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class OriginalWeights:
    """Reads tensors by name from a model's safetensors (one file, or shards listed in the index), lazily."""

    def __init__(self, files: dict[str, Path] | Path, base_model_prefix: str | None) -> None:
        self._files = files
        self._prefix = base_model_prefix

    def _file(self, key: str) -> Path | None:
        if isinstance(self._files, Path):
            return self._files
        return self._files.get(key)

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor saved under ``key`` or, for a checkpoint of the bare base model, without the task model's
        ``base_model_prefix`` (``model.layers.0...`` saved as ``layers.0...``)."""
        from safetensors import safe_open

        candidates = [key]
        if self._prefix and key.startswith(self._prefix + "."):
            candidates.append(key[len(self._prefix) + 1 :])
        for candidate in candidates:
            path = self._file(candidate)
            if path is None:
                continue
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                if candidate in handle.keys():  # noqa: SIM118  (safe_open handles have keys(), no __contains__)
                    return handle.get_tensor(candidate)
        raise KeyError(f"No tensor {' or '.join(map(repr, candidates))} in the model's safetensors ({self._files}).")


def _model_files(model_path: str | Path) -> dict[str, Path] | Path:
    """One safetensors file, or tensor name -> shard file from the index, for a file, folder or cached Hub id."""
    path = Path(model_path)
    if path.is_file():
        return path
    single = resolve_file(model_path, SINGLE_FILE, required=False, local_files_only=True)
    if single is not None:
        return single
    index = resolve_file(model_path, INDEX_FILE, required=False, local_files_only=True)
    if index is None:
        raise FileNotFoundError(
            f"replace_lora_weights_loftq reads the original weights from {SINGLE_FILE} or {INDEX_FILE} in "
            f"{str(model_path)!r}, and neither is there. Save the unquantised model with safetensors, or pass "
            "model_path pointing at it (pickled .bin checkpoints cannot be read lazily)."
        )
    weight_map = json.loads(Path(index).read_text())["weight_map"]
    shards = {name: resolve_file(model_path, name, local_files_only=True) for name in set(weight_map.values())}
    return {key: shards[name] for key, name in weight_map.items()}


def _default_model_path(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not name:
        raise ValueError(
            f"{type(model).__name__} does not record where it was loaded from (no config._name_or_path); pass "
            "model_path, the folder or file of its unquantised safetensors."
        )
    return name


def _linear4bit_layers(model: nn.Module) -> list[tuple[str, Linear4bit]]:
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear4bit)]
    if not layers:
        kinds = sorted({type(m).__name__ for m in model.modules() if isinstance(m, LoraLayer)})
        raise ValueError(
            "replace_lora_weights_loftq works on LoRA layers over bitsandbytes Linear4bit, and the model has none "
            f"(its LoRA layer types: {kinds or 'none'}). Load the base with BitsAndBytesConfig(load_in_4bit=True) "
            "before get_peft_model."
        )
    return layers


@torch.no_grad()
def replace_lora_weights_loftq(
    peft_model: nn.Module,
    model_path: str | Path | None = None,
    adapter_name: str = "default",
    callback: Callable[[nn.Module, str], bool] | None = None,
) -> None:
    """Set A and B of ``adapter_name`` on every 4-bit LoRA layer to the rank-r fit of W - dequant(Wq).

    Args:
        peft_model: a PeftModel whose base was loaded in 4 bits (bitsandbytes)
        model_path: the unquantised model's safetensors (a file, a folder, or a cached Hub id); default: where the
            base model was loaded from (``config._name_or_path``), from local files only
        adapter_name: the adapter to initialise
        callback: ``callback(peft_model, module_name) -> bool`` after each layer (``module_name`` as in the base
            model, e.g. ``model.layers.0.self_attn.q_proj``); False restores that layer's previous A and B
    """
    import_bitsandbytes("replace_lora_weights_loftq")
    base_model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    layers = _linear4bit_layers(base_model)
    files = _model_files(model_path if model_path is not None else _default_model_path(base_model))
    weights = OriginalWeights(files, getattr(base_model, "base_model_prefix", None))
    for name, layer in layers:
        if adapter_name not in layer.adapters:
            raise ValueError(f"Layer {name!r} has no adapter {adapter_name!r}; it has: {', '.join(layer.adapters)}.")
        quantised = layer.base_weight_2d()  # (out, in) float32
        original = weights.tensor(f"{name}.weight").to(device=quantised.device, dtype=torch.float32)
        lora_a, lora_b = low_rank_fit(original - quantised, layer.adapters[adapter_name].r)
        previous = [f.detach().clone() for f in layer._factors_2d(adapter_name)]
        layer.set_factors_2d(adapter_name, lora_a, lora_b)
        if callback is not None and not callback(peft_model, name):
            layer.set_factors_2d(adapter_name, *previous)
