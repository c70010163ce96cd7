"""``ensure_weight_tying``: keep an output head tied to the input embedding when the adapter trains the embedding.

A module is tied to the input embedding when its ``weight`` is the embedding's weight Parameter (transformers'
``tie_word_embeddings``: ``lm_head.weight is embed_tokens.weight``). As in PEFT:

- ``ensure_weight_tying=True`` and the embedding in ``modules_to_save``: the tied modules get a saved copy too,
  whose weight *is* the embedding copy's weight (one Parameter, trained once, saved under both names); the config's
  ``modules_to_save`` gains the embedding's path and loses entries naming the tied modules.
- ``ensure_weight_tying=True`` and no tied module, or nothing tied in the adapter: a warning (PEFT's text).
- ``ensure_weight_tying=True`` and LoRA on the embedding: the tied modules get a LoRA layer whose factors are
  Parameters on the embedding factors' storage, transposed (head A = embedding B^T (r, dim), head B = embedding
  A^T (vocab, r)), so the head's delta s B_h A_h = s (B_e A_e)^T is the embedding's, both (vocab, dim); the
  config's ``target_modules`` gains the embedding's path and loses entries naming the tied modules.
- ``ensure_weight_tying=True`` and no tied module, or nothing tied in the adapter: a warning (PEFT's text).
- ``ensure_weight_tying=False`` and a tied module in the adapter: PEFT's warning that the tie is not kept.
"""

from __future__ import annotations

import dataclasses
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
    lora: bool = False  # True: LoRA factors are tied (the embedding is a target), else saved copies


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
        config.target_modules = _targets_without_tied(targets, embedding, tied)
        return TyingPlan(embedding, tied, lora=True)
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


def _targets_without_tied(targets: list[str] | str, embedding: str, tied: list[str]) -> list[str] | str:
    """PEFT's rewrite of target_modules: the embedding always targeted, the tied modules left to the tying step."""
    if isinstance(targets, str):
        return rf"(?:{targets}|^{re.escape(embedding)}$)"
    return _without_tied(list(targets), embedding, tied)


def tie_lora_factors(model: nn.Module, plan: TyingPlan, adapter_name: str, config: LoraConfig, **inject_kw) -> None:
    """Give each tied module a LoRA layer for ``adapter_name`` whose factors share the embedding's storage."""
    from ..layers import LoraLayer
    from .inject import inject_lora

    source = model.get_submodule(plan.embedding)
    if not isinstance(source, LoraLayer) or adapter_name not in source.adapters:
        return
    record = source.adapters[adapter_name]
    for path in plan.tied:
        target = model.get_submodule(path)
        if not (isinstance(target, LoraLayer) and adapter_name in target.adapters):
            key = re.escape(path)
            only = dataclasses.replace(
                config, target_modules=f"({key})", exclude_modules=None, layers_to_transform=None,
                layers_pattern=None, rank_pattern={key: record.r}, alpha_pattern={key: record.lora_alpha},
                modules_to_save=None, trainable_token_indices=None, target_parameters=None, ensure_weight_tying=False,
            )  # fmt: skip
            inject_lora(model, only, adapter_name, **inject_kw)
            target = model.get_submodule(path)
        emb_a, emb_b = source._factors(adapter_name)  # (r, vocab), (dim, r)
        target.lora_A[adapter_name].weight = nn.Parameter(emb_b.t())  # (r, dim), the embedding's storage
        target.lora_B[adapter_name].weight = nn.Parameter(emb_a.t())  # (vocab, r)
        target.tied_lora_adapters = {*getattr(target, "tied_lora_adapters", ()), adapter_name}  # merging refuses


def tie_saved_copies(model: nn.Module, plan: TyingPlan, adapter_name: str) -> None:
    """Give each tied module a saved copy for ``adapter_name`` whose weight is the embedding copy's Parameter."""
    if plan.embedding is None or plan.lora:
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
