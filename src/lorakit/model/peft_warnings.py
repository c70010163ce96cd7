"""PEFT's warnings on adapter lifecycle conditions (same condition, same warning class; lorakit's wording).

Each function checks one condition and warns; callers in ``lora_model.py`` / ``mapping.py`` stay one line each.
The table of every PEFT LoRA warning and lorakit's status is in ``tests/test_peft_warnings_table.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch.nn as nn

LORA_PREFIX = "lora_"
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's names for the tied pair


def warn_adapter_name_in_prefix(adapter_name: str) -> None:
    """A name that is part of ``lora_`` (e.g. ``lora``) is taken for the prefix when state-dict keys are read."""
    if adapter_name and adapter_name in LORA_PREFIX:
        warnings.warn(
            f"Adapter name '{adapter_name}' should not be contained in the prefix '{LORA_PREFIX}'. "
            "This may lead to reinitialization of the adapter weights during loading.",
            stacklevel=4,
        )


def warn_tied_targets_on_merge(model: nn.Module, targeted: Iterable[str]) -> None:
    """Merging LoRA on ``embed_tokens``/``lm_head`` of a model with ``tie_word_embeddings`` changes both."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return
    tied = [name for name in targeted if name.rpartition(".")[2] in EMBEDDING_LAYER_NAMES]
    if tied:
        warnings.warn(
            f"Model with `tie_word_embeddings=True` and the tied_target_modules={tied} are part of the adapter. "
            "This can lead to complications: merging writes the delta into the weight the tied layers share. "
            "To merge safely, untie the embeddings first (load the base with tie_word_embeddings=False and copy the "
            "embedding weight into lm_head), then load and merge the adapter.",
            stacklevel=3,
        )


def warn_merging_more(merged: Iterable[str], pending: Iterable[str]) -> None:
    """Some adapters are merged already and more are merged on top."""
    merged, pending = sorted(set(merged)), sorted(set(pending))
    if merged and pending:
        warnings.warn(
            f"Already following adapters were merged {','.join(merged)}. "
            f"You are now additionally merging {','.join(pending)}.",
            stacklevel=3,
        )


def warn_active_adapter_deleted(adapter_name: str, was_active: bool, now_active: list[str]) -> None:
    if was_active and now_active:
        warnings.warn(
            f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
            f"{now_active[0] if len(now_active) == 1 else now_active}.",
            stacklevel=3,
        )


def warn_nothing_merged() -> None:
    warnings.warn("Already unmerged. Nothing to do.", stacklevel=3)


def warn_get_peft_model_settings(config, revision: str | None, low_cpu_mem_usage: bool) -> None:
    """get_peft_model's notes: the config's revision replaced, EVA without ``low_cpu_mem_usage``. (PEFT's third, a
    ``base_model_name_or_path`` replaced by the model's name, has no lorakit counterpart: lorakit keeps the name the
    config gives and fills it from the model only when it is None.)"""
    if revision is not None and config.revision is not None and config.revision != revision:
        warnings.warn(
            f"peft config has already set base model revision to {config.revision}, overwriting with revision "
            f"{revision}",
            stacklevel=3,
        )
    if config.init_lora_weights == "eva" and not low_cpu_mem_usage:
        warnings.warn(
            "lora with eva initialization used with low_cpu_mem_usage=False. Setting low_cpu_mem_usage=True can "
            "improve the maximum batch size possible for eva initialization.",
            stacklevel=3,
        )


_BASE_CHANGING = {"pissa": "PiSSA", "corda": "CorDA", "olora": "OLoRA"}  # PEFT's order of precedence


def warn_base_changing_with_others(configs: list) -> None:
    """load_adapter where the new or an existing adapter changed the base weights (PiSSA/CorDA/OLoRA)."""
    if len(configs) < 2:
        return
    inits = {getattr(config, "init_lora_weights", None) for config in configs}
    name = next((label for init, label in _BASE_CHANGING.items() if init in inits), None)
    if name is not None:
        warnings.warn(
            f"{name} changes the base weights of the model and should thus not be used with other adapters. "
            f"Consider converting the {name} adapter into a normal LoRA adapter (save_pretrained with "
            "path_initial_model_for_weight_conversion).",
            stacklevel=4,
        )


def warn_existing_peft_config(model: nn.Module) -> None:
    """The user's model already carries a ``peft_config`` attribute (transformers' own adapter integration, or code
    that set one): PEFT adds the new adapter's config to it; lorakit keeps its configs on its LoraModel."""
    if hasattr(model, "peft_config"):
        warnings.warn(
            "Already found a `peft_config` attribute in the model. This will lead to having multiple adapters in the "
            "model (lorakit keeps the new adapter's config on its own LoraModel and leaves that attribute as it is). "
            "Make sure to know what you are doing!",
            stacklevel=4,
        )
