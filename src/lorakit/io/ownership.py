"""Which model tensors a loaded adapter file may fill: those of the adapter being loaded, and nothing else.

An adapter's tensors are its LoRA factors, its modules_to_save copies and its trainable-token rows, plus the base
tensors that saving this adapter writes (biases under ``bias="all"``/``"lora_only"``, the embedding layers'
weights when the embeddings are targeted or the vocabulary was resized). A file key that lands on any other base
weight or on another adapter's tensor is refused: loading it would change the base model or that adapter, and
``delete_adapter`` could not undo it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..config import LoraConfig
from .state_dict import AdapterKeys, adapter_state_dict


def _config(model: nn.Module, adapter_name: str) -> LoraConfig:
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and adapter_name in configs:
        return configs[adapter_name]
    return LoraConfig()  # a model injected in place keeps no config: LoRA tensors and modules_to_save only


def saved_base_keys(model: nn.Module, adapter_name: str, keys: AdapterKeys) -> set[str]:
    """In-memory keys of the base tensors that saving ``adapter_name`` writes (biases, embedding weights)."""
    saved = adapter_state_dict(model, adapter_name, _config(model, adapter_name), quiet=True)
    return {k for k in saved if not keys.is_adapter_key(k)}


def check_ownership(model: nn.Module, memory: dict[str, torch.Tensor], adapter_name: str, source: str) -> None:
    """Raise, naming the keys, when in-memory ``memory`` keys would fill anything but adapter ``adapter_name``."""
    keys = AdapterKeys(model)
    foreign: dict[str, str] = {}
    base: list[str] = []
    for key in memory:
        owner = keys.adapter_of(key)
        if owner is None:
            base.append(key)
        elif owner != adapter_name:
            foreign[key] = owner
    if base:
        allowed = saved_base_keys(model, adapter_name, keys)
        base = sorted(k for k in base if k not in allowed)
    if not (foreign or base):
        return
    parts = []
    if foreign:
        shown = ", ".join(f"{k!r} (adapter {o!r})" for k, o in sorted(foreign.items())[:5])
        parts.append(f"{len(foreign)} tensors of other adapters: {shown}")
    if base:
        parts.append(f"{len(base)} base-model tensors this adapter does not save: {base[:5]}")
    why = (
        " Base tensors are taken only where the adapter's own config saves them (bias='all'/'lora_only', targeted "
        "embedding layers, the embeddings of a resized vocabulary); save_embedding_layers=True on an unresized, "
        "untargeted vocabulary saves base weights that lorakit does not load back."
        if base
        else ""
    )
    raise ValueError(
        f"Adapter {source} may only fill the tensors of adapter {adapter_name!r}, but it would overwrite "
        + "; and ".join(parts)
        + f". Nothing was loaded.{why} Otherwise the file was altered or written for another model."
    )
