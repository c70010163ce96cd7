"""Preparing a k-bit quantised transformers model for LoRA training (QLoRA, arXiv:2305.14314), as PEFT's
``prepare_model_for_kbit_training``: freeze everything, keep the non-quantised parameters (layer norms, embeddings,
head) in float32 so their updates and statistics are not computed in half precision, and for quantised models switch
on activation checkpointing with the input-grad hook a frozen base needs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .integrations.checkpointing import enable_checkpointing

HALF_DTYPES = (torch.float16, torch.bfloat16)
NO_UPCAST_METHODS = {"gptq", "aqlm", "eetq", "hqq", "torchao"}
"""Quantisation methods whose half-precision tensors belong to the quantised format and must stay as they are."""


def _quantisation_method(model: nn.Module) -> str:
    method = getattr(model, "quantization_method", None)
    if getattr(model, "hqq_quantized", False):
        return "hqq"
    return str(getattr(method, "value", method) or "")


def _is_quantised(model: nn.Module) -> bool:
    loaded_kbit = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    return bool(loaded_kbit) or _quantisation_method(model) in NO_UPCAST_METHODS


def _upcast_half_parameters(model: nn.Module) -> None:
    """float16/bfloat16 parameters -> float32, except bitsandbytes' packed 4-bit weights (their storage dtype may be
    a half type too)."""
    for param in model.parameters():
        if param.dtype in HALF_DTYPES and type(param).__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Freeze ``model``, upcast its non-quantised half-precision parameters to float32 and, when it was loaded
    quantised (bitsandbytes 4/8-bit, GPTQ, AQLM, EETQ, HQQ, torchao) and ``use_gradient_checkpointing`` is on,
    enable activation checkpointing (with ``gradient_checkpointing_kwargs``, e.g. ``{"use_reentrant": False}``) and
    make the input embeddings' output require grad. Returns the same model.

    Call it on the transformers model before ``get_peft_model``. ``auto_clear_cache`` empties the CUDA cache after
    the upcast, as PEFT does.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if _quantisation_method(model) not in NO_UPCAST_METHODS:
        _upcast_half_parameters(model)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    if _is_quantised(model) and use_gradient_checkpointing:
        enable_checkpointing(model, dict(gradient_checkpointing_kwargs or {}))
    return model
