"""Which modules a LoraConfig targets: names, regexes, 'all-linear', exclusions and layer filters.

Matching follows PEFT: a list entry matches a module path exactly or as a dotted suffix; a string is a regex that
must match the whole path; exclusions use the same syntax; ``layers_to_transform`` filters on the first numbered
path segment (or the one after ``layers_pattern``), except for paths listed exactly.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

import torch.nn as nn

from ..config import LoraConfig, TaskType

ALL_LINEAR = "all-linear"
SEQ_CLS_HEAD_NAMES = ("score", "classifier")


def linear_types() -> tuple[type, ...]:
    """nn.Linear and transformers' Conv1D (imported lazily)."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def matches_any(names: list[str] | str | None, key: str) -> bool:
    """PEFT's name matching: regex full match for a string, exact or dotted suffix for a list."""
    if not names:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return any(key == n or key.endswith("." + n) for n in names)


def is_excluded(config: LoraConfig, key: str) -> bool:
    """Excluded explicitly, or inside a module that is saved in full (modules_to_save)."""
    if matches_any(config.exclude_modules, key):
        return True
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in config.modules_to_save or [])


def layer_index(key: str, layers_pattern: list[str] | str | None) -> int | None:
    """Index of the layer that ``key`` lives in, or None."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", key)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", key)
            if match:
                break
    return int(match.group(1)) if match else None


def in_selected_layers(config: LoraConfig, key: str) -> bool:
    wanted = config.layers_to_transform
    if wanted is None or (isinstance(wanted, list) and not wanted):
        return True
    idx = layer_index(key, config.layers_pattern)
    if idx is None:
        return False
    return idx == wanted if isinstance(wanted, int) else idx in wanted


def is_target(config: LoraConfig, key: str) -> bool:
    """True when the module at path ``key`` (inside the user's model) should get a LoRA layer."""
    if is_excluded(config, key) or config.target_modules is None:
        return False
    if not matches_any(config.target_modules, key):
        return False
    # as PEFT: the layer filter applies to suffix matches; a path listed exactly is always taken
    return isinstance(config.target_modules, str) or key in config.target_modules or in_selected_layers(config, key)


def expand_all_linear(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full paths of every linear layer except the output embedding (and the SEQ_CLS head), as PEFT 0.21."""
    from ..layers.base import LoraLayer

    excluded_ids: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    output_emb = get_out() if callable(get_out) else None
    if output_emb is not None:
        excluded_ids.add(id(output_emb))
    elif config.task_type == TaskType.SEQ_CLS:
        for head in SEQ_CLS_HEAD_NAMES:
            if getattr(model, head, None) is not None:
                excluded_ids.add(id(getattr(model, head)))
                break
    excluded_names = {n for n, m in model.named_modules() if id(m) in excluded_ids}
    names: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):  # wrapped by an earlier adapter: its base decides, its internals never count
            if isinstance(module.get_base_layer(), linear_types()):
                names.add(name)
            excluded_names.update(f"{name}.{sub}" for sub, _ in module.named_modules() if sub)
        elif isinstance(module, linear_types()):
            names.add(name)
    return sorted(names - excluded_names)


def resolve_target_names(model: nn.Module, config: LoraConfig) -> list[str] | str | None:
    """The effective target_modules: defaults for None, leaf names for 'all-linear', else as given."""
    from .defaults import default_target_modules

    targets = config.target_modules
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return expand_all_linear(model, config)
    if targets is None and not config.target_parameters:
        model_config = getattr(model, "config", None)
        return default_target_modules(getattr(model_config, "model_type", None))
    return targets


def _adaptable(module: nn.Module, config: LoraConfig) -> bool:
    """Whether some registered LoRA layer type can wrap ``module``."""
    from ..layers.registry import LAYER_TYPES

    return any(entry.matches(module, config) for entry in LAYER_TYPES)


def _filters_that_removed(config: LoraConfig, matched: list[str]) -> list[str]:
    """Which of exclude_modules / modules_to_save / layers_to_transform removed the ``matched`` paths."""
    reasons = []
    if any(matches_any(config.exclude_modules, n) for n in matched):
        reasons.append(f"exclude_modules={config.exclude_modules!r}")
    if any(is_excluded(config, n) and not matches_any(config.exclude_modules, n) for n in matched):
        reasons.append(f"modules_to_save={config.modules_to_save!r} (modules saved in full are not adapted)")
    if not isinstance(config.target_modules, str) and config.layers_to_transform is not None:
        indices = sorted({i for i in (layer_index(n, config.layers_pattern) for n in matched) if i is not None})
        where = f"layers_pattern={config.layers_pattern!r}" if config.layers_pattern else "the first numbered segment"
        found = indices or "none"
        reasons.append(f"layers_to_transform={config.layers_to_transform!r} (layer indices from {where}: {found})")
    return reasons


def unmatched_entries(config: LoraConfig, names: Iterable[str]) -> list[str]:
    """Entries of a list target_modules that match no module path at all (typos, other architectures)."""
    if not isinstance(config.target_modules, list):
        return []
    names = list(names)
    return [t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in names)]


def unused_exclusions(config: LoraConfig, names: Iterable[str]) -> list[str]:
    """Entries of exclude_modules (a list, or the one regex) that match no module path, so exclude nothing."""
    excluded = config.exclude_modules
    if not excluded:
        return []
    names = list(names)
    entries = [excluded] if isinstance(excluded, str) else list(excluded)
    as_given = (lambda e: e) if isinstance(excluded, str) else (lambda e: [e])  # regex, or exact / dotted suffix
    return [e for e in entries if not any(matches_any(as_given(e), n) for n in names)]


def _regex_hint(pattern: str, adaptable_paths: list[str]) -> str:
    partial = next((n for n in adaptable_paths if re.search(pattern, n)), None)
    if partial is not None:
        return (
            f" The regex {pattern!r} matches only part of paths such as {partial!r}; a string target_modules must "
            f"match the whole path (e.g. {'.*' + pattern!r}), or pass a list of names."
        )
    example = adaptable_paths[0] if adaptable_paths else ""
    return f" A string target_modules is a regex that must match a whole module path, such as {example!r}."


def explain_no_match(config: LoraConfig, modules: Iterable[tuple[str, nn.Module]]) -> str:
    """An error message naming what was requested, why nothing was selected, and the closest module names.

    ``modules`` are ``(path, module)`` pairs of the model (LoRA internals left out).
    """
    modules = [(n, m) for n, m in modules if n]
    requested = config.target_modules
    matched = [n for n, _ in modules if matches_any(requested, n)]
    if matched:
        shown = ", ".join(matched[:3]) + (" ..." if len(matched) > 3 else "")
        return (
            f"Target modules {requested!r} match {len(matched)} module(s) ({shown}) but none is left after "
            f"{'; '.join(_filters_that_removed(config, matched))}. Check these settings."
        )
    adaptable = sorted({n.rsplit(".", 1)[-1] for n, m in modules if _adaptable(m, config)})
    message = f"Target modules {requested!r} not found in the base model."
    if isinstance(requested, str):
        message += _regex_hint(requested, [n for n, m in modules if _adaptable(m, config)])
    else:
        wanted = list(requested or [])
        close = sorted({c for t in wanted for c in difflib.get_close_matches(t.rsplit(".", 1)[-1], adaptable, n=3)})
        if close:
            message += f" Did you mean: {', '.join(close)}?"
    shown = ", ".join(adaptable[:40]) + (" ..." if len(adaptable) > 40 else "")
    return message + f" Modules LoRA can wrap in this model: {shown or 'none'}."
