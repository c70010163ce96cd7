"""Gradient (activation) checkpointing of a lorakit model.

Checkpointing itself is the base model's (transformers' ``activation_checkpointing_enable`` or, before 5.x,
``gradient_checkpointing_enable``). What LoRA adds: the base is frozen, so with *reentrant* checkpointing no input of a
checkpointed block requires grad and ``torch.utils.checkpoint`` would drop the backward of the whole block, LoRA
weights included (their grads silently stay None). A forward hook that marks the input embeddings' output as
requiring grad restores the graph. It is cheap and harmless for non-reentrant checkpointing, so it is always added.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn


def is_checkpointing(model: nn.Module) -> bool:
    """Whether the model has activation checkpointing switched on (without transformers' deprecation warning)."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr):
            return bool(getattr(model, attr))
    return False


def _mark_output_requires_grad(module: nn.Module, inputs: Any, output: Any) -> None:
    output.requires_grad_(True)


def require_input_grads(model: nn.Module) -> None:
    """Make the input embeddings' output require grad (transformers' ``enable_input_require_grads`` where it exists).

    Raises ValueError for a model that exposes neither that method nor ``get_input_embeddings``.
    """
    if hasattr(model, "enable_input_require_grads"):
        if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None):
            model.disable_input_require_grads()  # re-enabling must not stack a second hook
        model.enable_input_require_grads()
        return
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if get_embeddings is not None else None
    if embeddings is None:
        raise ValueError(
            f"{type(model).__name__} has neither enable_input_require_grads() nor get_input_embeddings(); make the "
            "input of the first checkpointed block require grad yourself, or use use_reentrant=False."
        )
    previous = getattr(model, "_lorakit_input_grad_hook", None)
    if previous is not None:
        previous.remove()
    model._lorakit_input_grad_hook = embeddings.register_forward_hook(_mark_output_requires_grad)


def enable_checkpointing(model: nn.Module, checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """Switch on the base model's activation checkpointing and add the input-grad hook a frozen base needs.

    Args:
        model: the user's (base) model, e.g. a transformers ``PreTrainedModel``
        checkpointing_kwargs: passed to ``torch.utils.checkpoint.checkpoint`` (e.g. ``{"use_reentrant": True}``)
        kwargs: further options of the base model's method (``every_n_layers``, ``offload`` in transformers 5.x)
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing_kwargs, **kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs, **kwargs)
    else:
        raise ValueError(
            f"{type(model).__name__} does not support gradient checkpointing (it has neither "
            "activation_checkpointing_enable nor gradient_checkpointing_enable); wrap its blocks in "
            "torch.utils.checkpoint yourself."
        )
    require_input_grads(model)
