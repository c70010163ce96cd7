"""A causal LM's training forward with the loss computed from the backbone's hidden states in chunks.

It does what transformers' ``*ForCausalLM.forward`` does, in the same order, except that the logits are never
built: the backbone (``model.<base_model_prefix>``) runs with the same arguments, its last hidden state is sliced by
``logits_to_keep``, the labels are shifted (or ``shift_labels`` taken), and the cross-entropy of the output
embeddings' projection (``model.get_output_embeddings()``: ``lm_head``, its LoRA layer, tied embeddings) is taken in
chunks by ``chunked.py`` (or Liger's kernel, ``liger.py``), reduced as ``ForCausalLMLoss`` reduces it (mean over
non-ignored targets, or the sum / ``num_items_in_batch``). The family's logits map and MoE auxiliary loss come
from ``heads.py``. The output has ``loss`` and ``logits=None``; everything else is the backbone's.

``fused_causal_lm_forward`` returns None when the model's own forward must run instead: no labels (nothing to
fuse), ``fused_lm_head=True`` (TRL's trainers ask a forward they patched for per-token log-probabilities), or a
reason the result could differ (warned once per reason): a class without a head recipe, a forward replaced on the
instance or patched on the class, a custom loss function, ``return_dict=False``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn as nn

from .chunked import ChunkedHead, chunk_rows, chunked_linear_cross_entropy
from .cross_entropy import check_targets
from .heads import HEADS, HeadRecipe, LogitsMap, head_recipe, moe_aux_loss
from .labels import causal_targets, loss_denominator
from .liger import liger_applies, liger_linear_cross_entropy
from .settings import FusedLossSettings

_NOT_FOR_BACKBONE = ("labels", "logits_to_keep", "return_dict")


def bound_arguments(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The call's arguments by name (positional ones named by ``model.forward``'s signature), or None if they do
    not fit it (the model's own forward then raises its own error)."""
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return None
    call = dict(bound.arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            call.update(call.pop(name, {}))
    return call


def _is_default_causal_loss(model: nn.Module) -> bool:
    from transformers.loss.loss_utils import ForCausalLMLoss

    return getattr(model, "loss_function", None) is ForCausalLMLoss


def fallback_reason(model: nn.Module, call: dict[str, Any]) -> str | None:
    """Why the fused loss cannot give exactly the model's own loss here, or None."""
    name = type(model).__name__
    if head_recipe(model) is None:
        return (
            f"{name} has no head recipe (known: {', '.join(sorted(HEADS))}); "
            "lorakit.loss.register_head adds one once its forward is checked"
        )
    if "forward" in vars(model):
        return f"{name}.forward was replaced on the instance (TRL's add_fused_lm_head, a monkey patch)"
    forward_module = getattr(type(model).forward, "__module__", None)
    if forward_module not in {cls.__module__ for cls in type(model).__mro__}:
        return f"{name}.forward was patched (it comes from {forward_module}, e.g. Liger's model patches)"
    if not isinstance(getattr(model, getattr(model, "base_model_prefix", ""), None), nn.Module):
        return f"{name} has no backbone at base_model_prefix={getattr(model, 'base_model_prefix', None)!r}"
    if model.get_output_embeddings() is None:
        return f"{name} has no output embeddings (get_output_embeddings() is None)"
    if not _is_default_causal_loss(model):
        return f"{name} uses a loss other than transformers' ForCausalLMLoss (loss_type or a custom loss_function)"
    if call.get("return_dict") is False:
        return "return_dict=False (a tuple without logits would shift every later field)"
    return None


def keep_positions(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """(B, T, H) -> the rows transformers projects: the last k positions (0: all), 1D / 2D integer positions, or a
    2D boolean mask (flattened to (n, H))."""
    if torch.is_tensor(logits_to_keep) and logits_to_keep.ndim == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden[logits_to_keep]
        return torch.take_along_dim(hidden, logits_to_keep[..., None], dim=1)
    if isinstance(logits_to_keep, int):
        return hidden[:, -logits_to_keep:, :] if logits_to_keep else hidden
    return hidden[:, logits_to_keep, :]


def _loss(
    model: nn.Module, recipe: HeadRecipe, hidden: torch.Tensor, call: dict[str, Any], settings: FusedLossSettings
) -> torch.Tensor:
    head = model.get_output_embeddings()
    ignore_index = call.get("ignore_index", -100)
    hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, H)
    targets = causal_targets(call.get("labels"), call.get("shift_labels"), ignore_index, hidden.device)
    if targets.numel() != hidden.shape[0]:
        raise ValueError(
            f"labels give {targets.numel()} targets but the kept hidden states have {hidden.shape[0]} rows "
            f"(logits_to_keep={call.get('logits_to_keep', 0)!r}); they must match, as for the model's own loss."
        )
    denominator = loss_denominator(targets, ignore_index, call.get("num_items_in_batch"))
    vocab = getattr(head, "out_features", None) or model.config.get_text_config().vocab_size
    check_targets(targets[targets != ignore_index], vocab)
    logits_map: LogitsMap = recipe.logits(model)
    if settings.use_liger and liger_applies(head, hidden):
        return liger_linear_cross_entropy(head, logits_map, hidden, targets, ignore_index, denominator)
    plan = ChunkedHead(head, logits_map, chunk_rows(vocab, settings.chunk_size), ignore_index)
    return chunked_linear_cross_entropy(plan, hidden, targets, denominator)


def _output(outputs: Any, loss: torch.Tensor, moe_fields: dict[str, Any] | None) -> Any:
    from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

    cls = CausalLMOutputWithPast if moe_fields is None else MoeCausalLMOutputWithPast
    names = {f.name for f in dataclasses.fields(cls)} - {"loss", "logits", "last_hidden_state"}
    fields = {k: v for k, v in outputs.items() if k in names}
    return cls(loss=loss, logits=None, **fields, **(moe_fields or {}))


def fused_causal_lm_forward(
    model: nn.Module,
    args: tuple,
    kwargs: dict[str, Any],
    settings: FusedLossSettings,
    scope: Callable[[], AbstractContextManager] | None = None,
) -> Any | None:
    """``model(*args, **kwargs)`` with the loss fused, or None where the model's own forward must run.

    ``scope`` wraps the backbone call (the LoRA model's per-call scope); the loss is computed after it.
    """
    call = bound_arguments(model, args, kwargs)
    if call is None or call.get("labels") is None or call.get("fused_lm_head"):
        return None  # nothing to fuse, or the caller asked for the model's own fused head (TRL's)
    reason = fallback_reason(model, call)
    if reason is not None:
        settings.fall_back(reason)
        return None
    recipe = head_recipe(model)
    backbone_kwargs = {k: v for k, v in call.items() if k not in _NOT_FOR_BACKBONE}
    router = None
    if recipe.moe:
        router = call.get("output_router_logits")
        router = model.config.output_router_logits if router is None else router
        backbone_kwargs["output_router_logits"] = router
    backbone = getattr(model, model.base_model_prefix)
    with scope() if scope is not None else contextlib.nullcontext():
        outputs = backbone(**backbone_kwargs)
    hidden = keep_positions(outputs.last_hidden_state, call.get("logits_to_keep", 0))
    loss = _loss(model, recipe, hidden, call, settings)
    moe_fields = None
    if recipe.moe:
        moe_fields = {"aux_loss": None}
        if router:
            moe_fields["aux_loss"], weighted = moe_aux_loss(model, outputs.router_logits, call.get("attention_mask"))
            loss = loss + weighted.to(loss.device)
    return _output(outputs, loss, moe_fields)

