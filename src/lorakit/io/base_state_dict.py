"""The base model's own tensors under its original keys (PEFT's ``get_base_model_state_dict`` and
``set_base_model_state_dict``): lorakit's wrapper segments dropped from the keys, adapter tensors left out.

``q_proj.base_layer.weight`` -> ``q_proj.weight``; ``score.original_module.weight`` -> ``score.weight``;
``embed.token_adapter.base_layer.weight`` -> ``embed.weight``; ``q_proj.lora_A.default.weight`` and
``score.modules_to_save.default.weight`` are adapter tensors and are not returned.
"""

from __future__ import annotations

from collections import namedtuple

import torch
import torch.nn as nn

from ..layers import LoraLayer
from ..model.modules_to_save import ModulesToSaveWrapper
from ..tokens import TrainableTokensWrapper
from ..tokens.adapter import TokenAdapter

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])

# wrapper type -> the child that holds the original module; every other child or tensor of the wrapper is adapter state
_ORIGINAL_CHILD: tuple[tuple[type, str], ...] = (
    (LoraLayer, "base_layer"),
    (ModulesToSaveWrapper, "original_module"),
    (TrainableTokensWrapper, "token_adapter"),
    (TokenAdapter, "base_layer"),
)


def _root(model: nn.Module) -> nn.Module:
    """The model the adapters were injected into: PeftModel -> base_model.model, LoraModel -> model, else itself."""
    inner = getattr(model, "base_model", None)
    if isinstance(inner, nn.Module) and isinstance(getattr(inner, "model", None), nn.Module):
        return inner.model
    return model.model if type(model).__name__ == "LoraModel" else model


def _original_key(root: nn.Module, key: str) -> str | None:
    """``key`` of ``root.state_dict()`` as the unwrapped model names it; None for an adapter tensor."""
    parts = key.split(".")
    kept: list[str] = []
    current: nn.Module | None = root
    for part in parts:
        wrapper = next((child for kind, child in _ORIGINAL_CHILD if isinstance(current, kind)), None)
        if wrapper is not None:
            if part != wrapper:
                return None  # lora_A, modules_to_save, trainable_tokens_delta, ...: the adapter's
            current = current._modules[part]
            continue
        kept.append(part)
        current = current._modules.get(part) if current is not None else None
    return ".".join(kept)


def _key_map(root: nn.Module) -> dict[str, str]:
    """original key -> key in ``root.state_dict()``, for every base tensor (first key wins where weights are shared)."""
    out: dict[str, str] = {}
    for key in root.state_dict(keep_vars=True):
        original = _original_key(root, key)
        if original is not None:
            out.setdefault(original, key)
    return out


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with its original keys and no adapter tensors (a PeftModel, a LoraModel or a
    model with adapters injected in place). Unmerged weights are the base's own; merged ones include the deltas."""
    root = _root(model)
    state = root.state_dict()
    return {original: state[key] for original, key in _key_map(root).items()}


def set_base_model_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> IncompatibleKeys:
    """Load ``state_dict`` (keyed as the unwrapped base model) into the wrapped model's base tensors.

    Returns ``(missing_keys, unexpected_keys)``; with ``strict`` either being non-empty raises RuntimeError and
    nothing is loaded (as ``nn.Module.load_state_dict``)."""
    root = _root(model)
    mapping = _key_map(root)
    unexpected = [key for key in state_dict if key not in mapping]
    missing = [key for key in mapping if key not in state_dict]
    if strict and (missing or unexpected):
        errors = ([f"Missing key(s) in state_dict: {missing}"] if missing else []) + (
            [f"Unexpected key(s) in state_dict: {unexpected}"] if unexpected else []
        )
        raise RuntimeError("Error(s) in loading state_dict:\n\t" + "\n\t".join(errors))
    root.load_state_dict({mapping[k]: v for k, v in state_dict.items() if k in mapping}, strict=False)
    return IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)
