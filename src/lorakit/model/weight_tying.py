"""``ensure_weight_tying``: keep an output head tied to the input embedding when the adapter trains the embedding.

A module is tied to the input embedding when its ``weight`` is the embedding's weight Parameter (transformers'
``tie_word_embeddings``: ``lm_head.weight is embed_tokens.weight``). As in PEFT:

- ``ensure_weight_tying=True`` and the embedding in ``modules_to_save``: the tied modules get a saved copy too,
  whose weight *is* the embedding copy's weight (one Parameter, trained once, saved under both names); the config's
  ``modules_to_save`` gains the embedding's path and loses entries naming the tied modules.
- ``ensure_weight_tying=True`` and no tied module, or nothing tied in the adapter: a warning (PEFT's text).
- ``ensure_weight_tying=False`` and a tied module in the adapter: PEFT's warning that the tie is not kept.

LoRA on a tied embedding with ``ensure_weight_tying=True`` (PEFT ties the head's LoRA factors to the embedding's
transposed ones) is refused by name: lorakit cannot share transposed factors between layers yet.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch.nn as nn

from ..config import LoraConfig
from ..targeting import resolve_target_names
from ..targeting.match import matches_any
from .modules_to_save import ModulesToSaveWrapper

NOT_ENSURED = (
    "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but `ensure_weight_tying` is not "
    "set to True. This can lead to complications, for example when merging the adapter or converting your model to "
    "formats other than safetensors. Check the discussion here: https://github.com/huggingface/peft/issues/2777"
)
NOTHING_TIED_ADDED = (
    "You have requested `ensure_weight_tying`, but no tied modules are added in either `modules_to_save` or "
    "`target_modules`"
)
NO_TIED_MODULES = "You have requested `ensure_weight_tying`, but no tied modules were found in the model"


@dataclass
class TyingPlan:
    """What to tie after the adapter's modules_to_save are wrapped: the embedding's path and its tied modules."""

    embedding: str | None = None
    tied: list[str] = field(default_factory=list)


def _base_weight(module: nn.Module):
    if isinstance(module, ModulesToSaveWrapper):
        module = module.original_module
    get_base = getattr(module, "get_base_layer", None)
    if callable(get_base):
        module = get_base()
    return getattr(module, "weight", None)


def tied_with_embedding(model: nn.Module) -> tuple[str | None, list[str]]:
    """(path of the input embedding, paths of the other modules that share its weight Parameter)."""
    get_input = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get_input() if callable(get_input) else None
    except NotImplementedError:  # transformers models without token embeddings (Wav2Vec2ForCTC and the like)
        embedding = None
    weight = _base_weight(embedding) if embedding is not None else None
    if weight is None:
        return None, []
    inner = (".base_layer", ".original_module", ".modules_to_save.")
    name = None
    tied = []
    for path, module in model.named_modules():
        if not path or any(part in f"{path}." for part in inner):
            continue
        if module is embedding:
            name = path
        elif _base_weight(module) is weight and isinstance(module, nn.Module) and not path.startswith(f"{name}."):
            tied.append(path)
    return name, tied


def plan_weight_tying(model: nn.Module, config: LoraConfig) -> TyingPlan:
    """Warn as PEFT does and rewrite ``config.modules_to_save`` when the embedding's copy must stay tied; raises
    for LoRA on a tied embedding with ``ensure_weight_tying``."""
    embedding, tied = tied_with_embedding(model)
    if embedding is None:
        if config.ensure_weight_tying:
            warnings.warn(NO_TIED_MODULES, stacklevel=4)
        return TyingPlan()
    members = [embedding, *tied]
    saved = any(matches_any(list(config.modules_to_save or []), m) for m in members)
    targets = resolve_target_names(model, config)
    targeted = any(matches_any(targets, m) for m in members)
    if not config.ensure_weight_tying:
        if (saved or targeted) and tied:
            warnings.warn(NOT_ENSURED, stacklevel=4)
        return TyingPlan()
    if not tied:
        warnings.warn(NO_TIED_MODULES, stacklevel=4)
        return TyingPlan()
    if saved:
        config.modules_to_save = _without_tied([*(config.modules_to_save or [])], embedding, tied)
        return TyingPlan(embedding, tied)
    if targeted:
        raise ValueError(
            f"ensure_weight_tying=True with LoRA on the tied embedding {embedding!r} (tied to {tied}) is not supported "
            "by lorakit: it cannot share the embedding's transposed LoRA factors with the head. Train the embedding "
            "in full (modules_to_save) or with trainable_token_indices, or set ensure_weight_tying=False (the head "
            "then keeps the base weights)."
        )
    warnings.warn(NOTHING_TIED_ADDED, stacklevel=4)
    return TyingPlan()


def _without_tied(modules_to_save: list[str], embedding: str, tied: list[str]) -> list[str]:
    """PEFT's rewrite: the embedding's full path added, the first entry naming each tied module removed."""
    if embedding not in modules_to_save:
        modules_to_save.append(embedding)
    for key in tied:
        hit = next((m for m in modules_to_save if re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key)), None)
        if hit is not None:
            modules_to_save.remove(hit)
    return modules_to_save


def tie_saved_copies(model: nn.Module, plan: TyingPlan, adapter_name: str) -> None:
    """Give each tied module a saved copy for ``adapter_name`` whose weight is the embedding copy's Parameter."""
    if plan.embedding is None:
        return
    from .inject import wrap_modules_to_save

    source = model.get_submodule(plan.embedding)
    if not isinstance(source, ModulesToSaveWrapper) or adapter_name not in source.modules_to_save:
        return
    wrap_modules_to_save(model, plan.tied, adapter_name, auto_names=tuple(plan.tied))
    for path in plan.tied:
        wrapper = model.get_submodule(path)
        if isinstance(wrapper, ModulesToSaveWrapper) and adapter_name in wrapper.modules_to_save:
            wrapper.modules_to_save[adapter_name].weight = source.modules_to_save[adapter_name].weight
