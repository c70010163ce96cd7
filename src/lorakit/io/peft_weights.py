"""load_peft_weights: the tensors of a saved adapter (folder or Hub id), keyed as on disk, as PEFT returns them."""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from .checkpoint import read_adapter_weights

_PREFIXES = ("base_model.model.", "base_model.")


def default_device() -> str:
    """PEFT's default load device: the first accelerator torch sees, else the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    return "cpu"


def remap_keys(tensors: dict[str, torch.Tensor], key_mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    """Apply transformers-style ``key_mapping`` (regex -> replacement, first pattern that matches wins) to each key
    without its ``base_model.model.`` prefix; the prefix is put back. A key without that prefix is refused."""
    out = {}
    for key, value in tensors.items():
        prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"key_mapping needs PEFT state-dict keys starting with 'base_model.model.'; got {key!r}.")
        rest = key[len(prefix) :]
        for pattern, replacement in key_mapping.items():
            rest, count = re.subn(pattern, replacement, rest)
            if count:
                break
        out[prefix + rest] = value
    return out


def load_peft_weights(
    model_id: str | os.PathLike,
    device: str | torch.device | None = None,
    key_mapping: dict[str, str] | None = None,
    **hf_hub_download_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` (or ``adapter_model.bin``) from a folder or a Hub id.

    Args:
        model_id: adapter folder or Hub repo id; ``subfolder``, ``revision``, ``cache_dir``, ``token``,
            ``local_files_only`` and ``force_download`` go to huggingface_hub.
        device: where the tensors go (default: the accelerator if there is one, else CPU).
        key_mapping: optional regex -> replacement applied to the keys (see ``remap_keys``).
    Returns:
        {disk key: tensor}, e.g. ``base_model.model.lin0.lora_A.weight`` (r, in)
    """
    tensors = read_adapter_weights(model_id, device=device or default_device(), **hf_hub_download_kwargs)
    return remap_keys(tensors, key_mapping) if key_mapping else tensors
