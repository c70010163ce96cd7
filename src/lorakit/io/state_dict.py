"""Adapter state dicts in PEFT's on-disk key format, and back.

In memory a key carries the adapter name (``...q_proj.lora_A.default.weight``); on disk it does not
(``...q_proj.lora_A.weight``). modules_to_save copies are stored under the original module path.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..layers import LoraLayer
from ..model.modules_to_save import ModulesToSaveWrapper

if TYPE_CHECKING:
    from ..config import LoraConfig

PREFIX = "base_model.model."
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
_LORA_PARAM = re.compile(r"\.(lora_[A-Za-z_]+)\.([^.]+)(\.(weight|bias))?$")
_MTS = re.compile(r"\.modules_to_save\.([^.]+)\.")
TOKENS_DELTA = "token_adapter.trainable_tokens_delta"
_TOKENS = re.compile(rf"\.{re.escape(TOKENS_DELTA)}\.([^.]+)$")


def _lora_key_to_disk(key: str, adapter_name: str) -> str | None:
    """In-memory LoRA key of ``adapter_name`` -> disk key; None if the key is no LoRA key of that adapter."""
    match = _LORA_PARAM.search(key)
    if match is None or match.group(2) != adapter_name:
        return None
    attr, suffix = match.group(1), match.group(3) or ""
    if attr == "lora_magnitude_vector":
        suffix = ""  # PEFT stores the DoRA magnitude without ".weight"
    return key[: match.start()] + f".{attr}{suffix}"


def adapter_state_dict(
    peft_model: nn.Module,
    adapter_name: str,
    config: LoraConfig,
    save_embedding_layers: bool | str = "auto",
    state_dict: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors PEFT would save for ``adapter_name``, keyed as on disk (``base_model.model.`` prefix).

    ``state_dict`` replaces ``peft_model.state_dict()`` as the source of values (e.g. one gathered from FSDP shards);
    its keys must be the model's own."""
    full = peft_model.state_dict() if state_dict is None else state_dict
    out: dict[str, torch.Tensor] = {}
    for key, tensor in full.items():
        disk = _lora_key_to_disk(key, adapter_name)
        if disk is not None:
            out[disk] = tensor
            continue
        mts = _MTS.search(key)
        if mts is not None:
            if mts.group(1) == adapter_name:
                out[key[: mts.start()] + "." + key[mts.end() :]] = tensor
            continue
        tokens = _TOKENS.search(key)
        if tokens is not None:
            if tokens.group(1) == adapter_name:  # rows of a tied head live (and are saved) on the embedding only
                out[key[: tokens.start()] + "." + TOKENS_DELTA] = tensor
            continue
        if _LORA_PARAM.search(key) is None and _bias_saved(peft_model, key, config):
            out[key] = tensor
    out.update(_embedding_tensors(peft_model, full, adapter_name, config, save_embedding_layers))
    return out


def _bias_saved(peft_model: nn.Module, key: str, config: LoraConfig) -> bool:
    if config.bias == "none" or not key.endswith("bias") or ".original_module." in key:
        return False
    if config.bias == "all":
        return True
    return key.endswith(".base_layer.bias") and isinstance(
        peft_model.get_submodule(key[: -len(".base_layer.bias")]), LoraLayer
    )


def embedding_targeted(peft_model: nn.Module, config: LoraConfig) -> bool:
    targets = config.target_modules
    if isinstance(targets, str):
        base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
        return any(
            re.fullmatch(targets, name) and name.split(".")[-1] in EMBEDDING_LAYER_NAMES
            for name, _ in base.named_modules()
        )
    return bool(targets) and any(name in targets for name in EMBEDDING_LAYER_NAMES)


def _vocab_resized(peft_model: nn.Module, config: LoraConfig) -> bool:
    """True when the model's vocab size differs from its base model's config (found locally or in the cache)."""
    model_config = getattr(peft_model, "config", None)
    vocab, model_id = getattr(model_config, "vocab_size", None), config.base_model_name_or_path
    if not vocab or not model_id:
        return False
    try:
        from transformers import AutoConfig

        base_vocab = AutoConfig.from_pretrained(model_id, local_files_only=True).vocab_size
    except Exception:
        return False
    return base_vocab != vocab


def _embedding_tensors(
    peft_model: nn.Module, full: dict, adapter_name: str, config: LoraConfig, mode: bool | str
) -> dict[str, torch.Tensor]:
    targeted = embedding_targeted(peft_model, config)
    if mode == "auto":
        uses_tokens = config.trainable_token_indices is not None
        mode = (targeted and not uses_tokens) or _vocab_resized(peft_model, config)
    if not mode or not hasattr(peft_model, "get_input_embeddings"):
        return {}
    out: dict[str, torch.Tensor] = {}
    names = {id(m): n for n, m in peft_model.named_modules()}
    for layer in (peft_model.get_input_embeddings(), peft_model.get_output_embeddings()):
        # when embeddings are targeted only the wrapped ones are saved; after a resize, both
        if layer is None or id(layer) not in names or (targeted and not isinstance(layer, LoraLayer)):
            continue
        prefix = names[id(layer)] + "."
        for key, tensor in full.items():
            adapter_key = _LORA_PARAM.search(key) or _TOKENS.search(key) or ".modules_to_save." in key
            if key.startswith(prefix) and not adapter_key:
                out[key] = tensor
    return out


def to_memory_keys(
    peft_model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str
) -> dict[str, torch.Tensor]:
    """Disk keys -> in-memory keys of ``peft_model`` for ``adapter_name`` (prefix optional on disk)."""
    wrappers = {n for n, m in peft_model.named_modules() if isinstance(m, ModulesToSaveWrapper)}
    prefix = model_prefix(peft_model)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        full = prefix + key.removeprefix(PREFIX)
        out[_disk_key_to_memory(full, adapter_name, wrappers)] = tensor
    return out


def model_prefix(model: nn.Module) -> str:
    """Where the user's model sits in ``model``'s state dict: ``base_model.model.`` in a PeftModel, ``model.`` in a
    LoraModel, nothing in a model injected in place (``inject_adapter_in_model``)."""
    from ..model.lora_model import LoraModel

    for name, module in model.named_modules():
        if isinstance(module, LoraModel):
            return f"{name}.model." if name else "model."
    return ""


def _disk_key_to_memory(key: str, adapter_name: str, wrappers: set[str]) -> str:
    match = re.search(r"\.(lora_[A-Za-z_]+)(\.(weight|bias))?$", key)
    if match is not None:
        attr, suffix = match.group(1), match.group(2) or ""
        if attr == "lora_magnitude_vector":
            suffix = ".weight"
        return key[: match.start()] + f".{attr}.{adapter_name}{suffix}"
    if key.endswith("." + TOKENS_DELTA):
        return f"{key}.{adapter_name}"
    for wrapper in wrappers:
        if key.startswith(wrapper + "."):
            return f"{wrapper}.modules_to_save.{adapter_name}.{key[len(wrapper) + 1 :]}"
    return key
