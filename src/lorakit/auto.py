"""AutoPeftModel and its task classes: load the base model an adapter names, then the adapter, in one call.

``AutoPeftModelForCausalLM.from_pretrained(adapter)`` reads ``adapter_config.json``, loads
``base_model_name_or_path`` (a local folder or a Hub id, through transformers' ``from_pretrained`` and the Hub cache)
with the matching transformers auto class, grows its input embeddings when the adapter ships a larger tokenizer, and
returns the task's PeftModel. ``AutoPeftModel`` (no task) instantiates the class recorded in ``auto_mapping``, from an
allow-listed library only, as PEFT does.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch.nn as nn

from .config import LoraConfig, PeftConfig, TaskType
from .peft_model import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
_HUB_KWARGS = ("cache_dir", "local_files_only", "token", "force_download")
_ADAPTER_ONLY_KWARGS = (
    "subfolder",
    "torch_device",
    "ignore_mismatched_sizes",
    "autocast_adapter_dtype",
    "ephemeral_gpu_offload",
    "low_cpu_mem_usage",
)
_BOTH_KWARGS = ("device_map", "max_memory", "offload_folder")  # the base load places layers; the adapter follows


def get_default_import_allowlist() -> list[str]:
    """Libraries whose classes ``auto_mapping`` may name (PEFT's list)."""
    return ["diffusers", "lerobot", "megatron-core", "transformers"]


def _allowed(allowlist: list[str], library: str) -> bool:
    return library in allowlist or any(library.startswith(f"{allowed}.") for allowed in allowlist)


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(hub, base-model, adapter) keyword arguments: hub ones go everywhere, adapter ones only to the adapter load,
    placement ones to both, the rest to the base model's ``from_pretrained`` (e.g. ``torch_dtype``)."""
    hub = {k: v for k, v in kwargs.items() if k in _HUB_KWARGS}
    adapter = {k: v for k, v in kwargs.items() if k in _ADAPTER_ONLY_KWARGS or k in _BOTH_KWARGS}
    base = {k: v for k, v in kwargs.items() if k not in _ADAPTER_ONLY_KWARGS}
    return hub, base, adapter


class _BaseAutoPeftModel:
    _target_class: str | None = None  # name of the transformers auto class
    _target_peft_class: type[PeftModel] = PeftModel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise OSError(
            f"{type(self).__name__} is designed to be instantiated with "
            f"`{type(self).__name__}.from_pretrained(pretrained_model_name_or_path)`."
        )

    @classmethod
    def _base_class(cls, config: LoraConfig, import_allowlist: list[str]) -> Any:
        """The class to load the base model with: the task's transformers auto class, or ``auto_mapping``'s."""
        task_type = config.task_type
        if cls._target_class is None and task_type is not None:
            raise ValueError(
                f"Cannot use AutoPeftModel with task_type {TaskType(task_type).value!r}; use the task's class "
                "(e.g. AutoPeftModelForCausalLM for task_type='CAUSAL_LM')."
            )
        if task_type is not None:
            expected = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[TaskType(task_type)]
            if cls._target_peft_class is not expected:
                raise ValueError(
                    f"Expected target PEFT class: {expected.__name__}, but you have asked for: "
                    f"{cls._target_peft_class.__name__}; the adapter's task_type is {TaskType(task_type).value!r}."
                )
            return getattr(importlib.import_module("transformers"), cls._target_class)
        mapping = config.auto_mapping or {}
        if cls._target_class is not None or not mapping.get("base_model_class"):
            raise ValueError(
                "Cannot infer the base model class: the adapter config has neither a task_type nor an auto_mapping "
                f"(got task_type={task_type!r}, auto_mapping={config.auto_mapping!r})."
            )
        library = mapping.get("parent_library", "")
        if not _allowed(import_allowlist, library):
            raise ValueError(
                f"The auto mapping wants to import {library!r}, which is not in the import allowlist "
                f"{import_allowlist}; if importing it is safe, pass import_allowlist=[{library!r}]."
            )
        module = importlib.import_module(library)
        if not hasattr(module, mapping["base_model_class"]):
            raise ValueError(f"{library!r} has no class {mapping['base_model_class']!r} (named by auto_mapping).")
        return getattr(module, mapping["base_model_class"])

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: LoraConfig | None = None,
        revision: str | None = None,
        import_allowlist: list[str] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Load the base model named in the adapter's config, then the adapter; see the module docstring.

        Keyword arguments such as ``torch_dtype`` and ``device_map`` go to the base model's ``from_pretrained``;
        the adapter-loading ones (``torch_device``, ``low_cpu_mem_usage``, ...) to ``PeftModel.from_pretrained``."""
        hub, base_kwargs, adapter_kwargs = _split_kwargs(kwargs)
        subfolder = kwargs.get("subfolder")
        peft_config = PeftConfig.from_pretrained(
            pretrained_model_name_or_path, subfolder=subfolder, revision=revision, **hub
        )
        if not peft_config.base_model_name_or_path:
            raise ValueError(
                f"The adapter config at {str(pretrained_model_name_or_path)!r} has no base_model_name_or_path, so "
                "the base model to load is unknown; load it yourself and use PeftModel.from_pretrained(model, ...)."
            )
        target_class = cls._base_class(peft_config, import_allowlist or get_default_import_allowlist())
        base_model = target_class.from_pretrained(
            peft_config.base_model_name_or_path, revision=peft_config.revision, **base_kwargs
        )
        _resize_for_tokenizer(base_model, pretrained_model_name_or_path, revision, hub, kwargs)
        return cls._target_peft_class.from_pretrained(
            base_model,
            pretrained_model_name_or_path,
            adapter_name=adapter_name,
            is_trainable=is_trainable,
            config=config,
            revision=revision,
            **hub,
            **adapter_kwargs,
        )


def _resize_for_tokenizer(
    base_model: nn.Module, adapter: str | os.PathLike, revision: str | None, hub: dict[str, Any], kwargs: dict
) -> None:
    """Grow the input embeddings when the adapter folder ships a tokenizer with more tokens (as PEFT does)."""
    from .io.hub import resolve_file

    if not hasattr(base_model, "get_input_embeddings"):
        return
    try:
        found = resolve_file(
            adapter, TOKENIZER_CONFIG_NAME, subfolder=kwargs.get("subfolder"), revision=revision, required=False, **hub
        )
    except FileNotFoundError:  # a Hub id that cannot be reached: no tokenizer to look at
        found = None
    if found is None:
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(found.parent), trust_remote_code=kwargs.get("trust_remote_code", False)
    )
    if len(tokenizer) > base_model.get_input_embeddings().weight.shape[0]:
        base_model.resize_token_embeddings(len(tokenizer))


class AutoPeftModel(_BaseAutoPeftModel):
    _target_class = None
    _target_peft_class = PeftModel


class AutoPeftModelForCausalLM(_BaseAutoPeftModel):
    _target_class = "AutoModelForCausalLM"
    _target_peft_class = PeftModelForCausalLM


class AutoPeftModelForSeq2SeqLM(_BaseAutoPeftModel):
    _target_class = "AutoModelForSeq2SeqLM"
    _target_peft_class = PeftModelForSeq2SeqLM


class AutoPeftModelForSequenceClassification(_BaseAutoPeftModel):
    _target_class = "AutoModelForSequenceClassification"
    _target_peft_class = PeftModelForSequenceClassification


class AutoPeftModelForTokenClassification(_BaseAutoPeftModel):
    _target_class = "AutoModelForTokenClassification"
    _target_peft_class = PeftModelForTokenClassification


class AutoPeftModelForQuestionAnswering(_BaseAutoPeftModel):
    _target_class = "AutoModelForQuestionAnswering"
    _target_peft_class = PeftModelForQuestionAnswering


class AutoPeftModelForFeatureExtraction(_BaseAutoPeftModel):
    _target_class = "AutoModel"
    _target_peft_class = PeftModelForFeatureExtraction
