"""Adapter state dicts in PEFT's on-disk key format, and back.

In memory a key carries the adapter name (``...q_proj.lora_A.default.weight``); on disk it does not
(``...q_proj.lora_A.weight``). modules_to_save copies are stored under the original module path.

Adapter tensors are recognised by the model's structure (a LoRA layer's per-adapter containers, a
ModulesToSaveWrapper's copies), never by a ``lora_`` name fragment: a base module may itself be named ``lora_proj``.
"""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..layers import LoraLayer
from ..model.modules_to_save import ModulesToSaveWrapper

if TYPE_CHECKING:
    from ..config import LoraConfig

PREFIX = "base_model.model."
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
TOKENS_DELTA = "token_adapter.trainable_tokens_delta"
_TOKENS = re.compile(rf"\.{re.escape(TOKENS_DELTA)}\.([^.]+)$")


def _join(*parts: str) -> str:
    """Dotted key of the non-empty ``parts`` (a model that is itself a LoRA layer has the name "")."""
    return ".".join(p for p in parts if p)


WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
"""Module-name segments of torch wrappers (FSDP1 units, activation checkpointing) that their ``state_dict()``
leaves out of the keys (torch.compile's ``_orig_mod`` stays: its keys keep it)."""


def clean_name(name: str) -> str:
    """A module path as the keys of its wrappers' ``state_dict()`` spell it (wrapper segments removed)."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


class AdapterKeys:
    """Where a model keeps adapter tensors, read off its modules.

    ``lora_attrs``: LoRA layer name -> its per-adapter container names (``lora_A``, ``lora_B``,
    ``lora_embedding_A/B``, ``lora_magnitude_vector``); ``wrappers``: names of the ModulesToSaveWrappers."""

    def __init__(self, model: nn.Module) -> None:
        self.lora_attrs: dict[str, frozenset[str]] = {}
        self.wrappers: set[str] = set()
        for name, module in model.named_modules():
            name = clean_name(name)
            if isinstance(module, LoraLayer):
                self.lora_attrs[name] = frozenset(module.adapter_layer_names)
            elif isinstance(module, ModulesToSaveWrapper):
                self.wrappers.add(name)

    def lora_split(self, key: str) -> tuple[str, str, str] | None:
        """``<layer>.<attr>.<rest>`` -> (layer, attr, rest) when ``layer`` is a LoRA layer and ``attr`` one of its
        adapter containers; None for any other key (e.g. ``lora_proj.bias`` of a base module named ``lora_proj``)."""
        parts = key.split(".")
        for i in range(len(parts) - 1, -1, -1):
            layer = ".".join(parts[:i])
            if parts[i] in self.lora_attrs.get(layer, ()):
                return layer, parts[i], ".".join(parts[i + 1 :])
        return None

    def lora_adapter(self, key: str) -> tuple[str, str] | None:
        """In-memory LoRA key -> (adapter name, disk key); None for keys of no LoRA container."""
        split = self.lora_split(key)
        if split is None:
            return None
        layer, attr, rest = split
        adapter, _, suffix = rest.partition(".")
        if attr == "lora_magnitude_vector" or not suffix:
            return adapter, _join(layer, attr)  # PEFT stores the DoRA magnitude without ".weight"
        return adapter, _join(layer, attr, suffix)

    def copy_adapter(self, key: str) -> tuple[str, str] | None:
        """In-memory key of a modules_to_save copy -> (adapter name, disk key); None for other keys."""
        parts = key.split(".")
        for i, part in enumerate(parts[:-2]):
            if part == "modules_to_save" and ".".join(parts[:i]) in self.wrappers:
                return parts[i + 1], ".".join(parts[:i] + parts[i + 2 :])
        return None

    def is_adapter_key(self, key: str) -> bool:
        """Whether in-memory ``key`` is a tensor of some adapter (any name)."""
        return self.lora_split(key) is not None or self.copy_adapter(key) is not None or _TOKENS.search(key) is not None

    def adapter_of(self, key: str) -> str | None:
        """The adapter that owns in-memory ``key``, or None when no adapter does."""
        found = self.lora_adapter(key) or self.copy_adapter(key)
        if found is not None:
            return found[0]
        tokens = _TOKENS.search(key)
        return tokens.group(1) if tokens is not None else None


def adapter_state_dict(
    peft_model: nn.Module,
    adapter_name: str,
    config: LoraConfig,
    save_embedding_layers: bool | str = "auto",
    state_dict: dict[str, torch.Tensor] | None = None,
    quiet: bool = False,
) -> dict[str, torch.Tensor]:
    """The tensors PEFT would save for ``adapter_name``, keyed as on disk (``base_model.model.`` prefix).

    ``quiet``: no warnings about what ``save_embedding_layers="auto"`` decided (for callers that only read keys).

    ``state_dict`` replaces ``peft_model.state_dict()`` as the source of values (e.g. one gathered from FSDP shards);
    its keys must be the model's own."""
    full = peft_model.state_dict() if state_dict is None else state_dict
    keys = AdapterKeys(peft_model)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in full.items():
        found = keys.lora_adapter(key) or keys.copy_adapter(key)
        if found is not None:
            if found[0] == adapter_name:
                out[found[1]] = tensor
            continue
        tokens = _TOKENS.search(key)
        if tokens is not None:
            if tokens.group(1) == adapter_name:  # rows of a tied head live (and are saved) on the embedding only
                out[key[: tokens.start()] + "." + TOKENS_DELTA] = tensor
            continue
        if _bias_saved(peft_model, key, config):
            out[key] = tensor
    out.update(_embedding_tensors(peft_model, full, keys, config, save_embedding_layers, quiet))
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


def _embedding_layers(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """(input, output) embeddings; None for one a model cannot name (transformers raises NotImplementedError for
    models without token embeddings, e.g. Wav2Vec2ForCTC, whose ``lm_head`` all-linear targets)."""
    layers: list[nn.Module | None] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            layers.append(getattr(model, getter)())
        except (NotImplementedError, AttributeError):
            layers.append(None)
    return layers[0], layers[1]


def _embedding_tensors(
    peft_model: nn.Module, full: dict, keys: AdapterKeys, config: LoraConfig, mode: bool | str, quiet: bool = False
) -> dict[str, torch.Tensor]:
    targeted = embedding_targeted(peft_model, config)
    if mode == "auto":
        mode = _auto_save_embeddings(peft_model, config, targeted, quiet)
    if mode and not quiet and not hasattr(peft_model, "get_input_embeddings"):
        warnings.warn(
            "Could not identify embedding layer(s) because the model is not a 🤗 transformers model.", stacklevel=2
        )
    if not mode or not hasattr(peft_model, "get_input_embeddings"):
        return {}
    out: dict[str, torch.Tensor] = {}
    names = {id(m): n for n, m in peft_model.named_modules()}
    for layer in _embedding_layers(peft_model):
        # when embeddings are targeted only the wrapped ones are saved; after a resize, both
        if layer is None or id(layer) not in names or (targeted and not isinstance(layer, LoraLayer)):
            continue
        prefix = names[id(layer)] + "."
        for key, tensor in full.items():
            if key.startswith(prefix) and not keys.is_adapter_key(key):
                out[key] = tensor
    return out


def _auto_save_embeddings(peft_model: nn.Module, config: LoraConfig, targeted: bool, quiet: bool) -> bool:
    """save_embedding_layers="auto": True for targeted embeddings (without trainable tokens) or a resized vocabulary,
    with PEFT's warnings."""
    if targeted and config.trainable_token_indices is None:
        if not quiet:
            warnings.warn(
                "Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.", stacklevel=2
            )
        return True
    if _vocab_resized(peft_model, config):
        if not quiet:
            warnings.warn(
                "Setting `save_embedding_layers` to `True` as the embedding layer has been resized during finetuning.",
                stacklevel=2,
            )
        return True
    return False


def to_memory_keys(
    peft_model: nn.Module, state_dict: dict[str, torch.Tensor], adapter_name: str
) -> dict[str, torch.Tensor]:
    """Disk keys -> in-memory keys of ``peft_model`` for ``adapter_name`` (prefix optional on disk)."""
    keys = AdapterKeys(peft_model)
    prefix = model_prefix(peft_model)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        full = prefix + key.removeprefix(PREFIX)
        out[_disk_key_to_memory(full, adapter_name, keys)] = tensor
    return out


def model_prefix(model: nn.Module) -> str:
    """Where the user's model sits in ``model``'s state dict: ``base_model.model.`` in a PeftModel, ``model.`` in a
    LoraModel, nothing in a model injected in place (``inject_adapter_in_model``)."""
    from ..model.lora_model import LoraModel

    for name, module in model.named_modules():
        if isinstance(module, LoraModel):
            name = clean_name(name)  # as the keys of an FSDP1 root spell it
            return f"{name}.model." if name else "model."
    return ""


def _disk_key_to_memory(key: str, adapter_name: str, keys: AdapterKeys) -> str:
    split = keys.lora_split(key)
    if split is not None and split[2] in ("", "weight", "bias"):
        layer, attr, suffix = split
        if attr == "lora_magnitude_vector":
            suffix = "weight"
        return _join(layer, attr, adapter_name, suffix)
    if key.endswith("." + TOKENS_DELTA):
        return f"{key}.{adapter_name}"
    for wrapper in keys.wrappers:
        if key.startswith(wrapper + "."):
            return f"{wrapper}.modules_to_save.{adapter_name}.{key[len(wrapper) + 1 :]}"
    return key
