"""Which modules ``trainable_token_indices`` wraps, and how a head tied to the embedding follows it (PEFT's rules).

- A list applies to the input embedding (``get_input_embeddings()``, else a module named ``embed_tokens``); a dict
  maps module names (exact path or dotted suffix) to their token ids.
- A module whose weight *is* the input embedding's weight (a tied ``lm_head``) follows the embedding's rows, so
  input and output stay tied. When a dict names several tied modules with different ids they are trained separately
  and not tied (``ensure_weight_tying=True`` makes that an error instead); with the same ids only the embedding
  stores rows.
"""

from __future__ import annotations

import warnings

import torch.nn as nn

from ..config import LoraConfig
from .adapter import check_token_indices
from .wrapper import TrainableTokensWrapper

DEFAULT_EMBEDDING_NAME = "embed_tokens"


def _matches(path: str, key: str) -> bool:
    return path == key or path.endswith("." + key)


def _modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from ..model.inject import candidate_modules  # lazily: model.inject imports this module

    return [(p, m) for p, m in candidate_modules(model) if p]


def input_embedding_path(model: nn.Module) -> str | None:
    """Path of ``model.get_input_embeddings()`` inside ``model``, or None."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = getter() if getter is not None else None
    except (NotImplementedError, AttributeError):
        embedding = None
    return next((p for p, m in model.named_modules() if embedding is not None and m is embedding), None)


def _unwrapped_weight(module: nn.Module):
    """The base weight a module computes with (None for modules_to_save wrappers: their copy runs, not the base)."""
    from ..layers import LoraLayer
    from ..model.modules_to_save import ModulesToSaveWrapper

    if isinstance(module, TrainableTokensWrapper):
        module = module.original_module
    elif isinstance(module, LoraLayer):
        module = module.get_base_layer()
    elif isinstance(module, ModulesToSaveWrapper):
        return None
    return getattr(module, "weight", None)


def tied_paths(model: nn.Module, embedding_path: str | None) -> list[str]:
    """Modules (other than the embedding) whose weight is the input embedding's weight Parameter."""
    if embedding_path is None:
        return []
    weight = _unwrapped_weight(model.get_submodule(embedding_path))
    if weight is None:
        return []
    return [p for p, m in _modules(model) if p != embedding_path and _unwrapped_weight(m) is weight]


def token_targets(model: nn.Module, config: LoraConfig) -> dict[str, list[int]]:
    """Module name -> token ids, as the config asks (a list goes to the input embedding)."""
    spec = config.trainable_token_indices
    if isinstance(spec, dict):
        return dict(spec)
    return {input_embedding_path(model) or DEFAULT_EMBEDDING_NAME: spec}


def _tied_keys_to_skip(
    config: LoraConfig, targets: dict[str, list[int]], embedding_path: str | None, tied: list[str]
) -> tuple[set[str], bool]:
    """(dict keys handled by tying instead of own rows, whether tied modules ask for different ids)."""
    if embedding_path is None or not tied:
        return set(), False
    on_embedding = [k for k in targets if _matches(embedding_path, k)]
    on_tied = [k for k in targets if k not in on_embedding and any(_matches(p, k) for p in tied)]
    keys = on_embedding + on_tied
    if not on_embedding or not on_tied:
        return set(), False
    mismatch = any(targets[k] != targets[keys[0]] for k in keys[1:])
    if mismatch and config.ensure_weight_tying:
        asked = ", ".join(f"{k}: {targets[k]}" for k in keys)
        raise ValueError(
            "Cannot ensure weight tying when different token indices are specified for tied layers "
            f"(trainable_token_indices {asked}); use the same indices or set ensure_weight_tying=False."
        )
    return (set() if mismatch else set(on_tied)), mismatch


def _check_wrappable(module: nn.Module, path: str, config: LoraConfig, adapter_name: str) -> None:
    from ..layers import LoraLayer
    from ..model.modules_to_save import ModulesToSaveWrapper

    if isinstance(module, LoraLayer):
        raise ValueError(
            f"trainable_token_indices: {path!r} carries LoRA ({type(module).__name__}); a module gets either LoRA "
            "or trainable tokens, not both (PEFT refuses this too). Remove it from target_modules (or, for a head "
            "tied to the embedding, untie the weights)."
        )
    if isinstance(module, ModulesToSaveWrapper) or any(_matches(path, m) for m in config.modules_to_save or []):
        raise ValueError(
            f"trainable_token_indices: {path!r} is already trained in full via modules_to_save; list it in "
            "modules_to_save or in trainable_token_indices, not both."
        )
    if not isinstance(module, (nn.Embedding, nn.Linear, TrainableTokensWrapper)):
        raise ValueError(
            f"trainable_token_indices: {path!r} is a {type(module).__name__}; trainable tokens apply to "
            "torch.nn.Embedding modules (and Linear heads tied to them)."
        )
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        raise ValueError(f"trainable_token_indices: {path!r} uses max_norm, which trainable tokens do not support.")
    if isinstance(module, TrainableTokensWrapper) and module.token_adapter.has(adapter_name):
        raise ValueError(f"trainable_token_indices: {path!r} is named by two entries for adapter {adapter_name!r}.")


def _wrapper_at(model: nn.Module, path: str) -> TrainableTokensWrapper:
    from ..model.inject import split_parent

    module = model.get_submodule(path)
    if isinstance(module, TrainableTokensWrapper):
        return module
    wrapper = TrainableTokensWrapper(module)
    parent, child = split_parent(model, path)
    setattr(parent, child, wrapper)
    return wrapper


def _resolve(model: nn.Module, key: str) -> list[str]:
    paths = [p for p, _ in _modules(model) if _matches(p, key)]
    if not paths:
        embeddings = [p for p, m in _modules(model) if isinstance(m, (nn.Embedding, TrainableTokensWrapper))]
        raise ValueError(
            f"trainable_token_indices: module {key!r} not found in the base model; its embedding modules are: "
            f"{', '.join(embeddings) or 'none'}."
        )
    return paths


def _tie_source(model: nn.Module, config: LoraConfig) -> str | None:
    """The embedding that tied heads follow: the input embedding, or (list form, model without
    get_input_embeddings) the ``embed_tokens`` module if there is exactly one."""
    path = input_embedding_path(model)
    if path is None and not isinstance(config.trainable_token_indices, dict):
        paths = [p for p, _ in _modules(model) if _matches(p, DEFAULT_EMBEDDING_NAME)]
        path = paths[0] if len(paths) == 1 else None
    return path


def _own_rows(
    model: nn.Module, config: LoraConfig, adapter_name: str, targets: dict[str, list[int]], skip: set[str]
) -> list[tuple[str, list[int]]]:
    """(module path, checked token ids) of every module that stores rows of its own."""
    own: list[tuple[str, list[int]]] = []
    for key, indices in targets.items():
        if key in skip:
            continue
        for path in _resolve(model, key):
            module = model.get_submodule(path)
            _check_wrappable(module, path, config, adapter_name)
            base = module.original_module if isinstance(module, TrainableTokensWrapper) else module
            own.append((path, check_token_indices(indices, base.weight.shape[0], path)))
    return own


def wrap_trainable_tokens(
    model: nn.Module, config: LoraConfig, adapter_name: str, autocast_adapter_dtype: bool = True
) -> list[str]:
    """Give adapter ``adapter_name`` its token rows on the modules the config names (and tied heads); returns the
    wrapped module paths. Everything is checked before the model changes."""
    if config.trainable_token_indices is None:
        return []
    targets = token_targets(model, config)
    embedding_path = _tie_source(model, config)
    tied = tied_paths(model, embedding_path)
    skip, mismatch = _tied_keys_to_skip(config, targets, embedding_path, tied)
    own = _own_rows(model, config, adapter_name, targets, skip)
    if config.ensure_weight_tying and not tied:
        warnings.warn(
            "ensure_weight_tying=True but the model has no output layer tied to the input embedding; "
            "trainable_token_indices are applied without tying.",
            stacklevel=4,
        )
    follow = [] if mismatch or not any(p == embedding_path for p, _ in own) else tied
    for path in follow:
        _check_wrappable(model.get_submodule(path), path, config, adapter_name)
    for path, indices in own:
        _wrapper_at(model, path).add(adapter_name, indices, autocast_adapter_dtype)
    for path in follow:
        _wrapper_at(model, path).follow(adapter_name, _wrapper_at(model, embedding_path).token_adapter)
    return [p for p, _ in own] + follow
