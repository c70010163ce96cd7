"""Injection: find the modules a LoraConfig targets and wrap (or extend) them with LoRA layers."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import torch.nn as nn

from ..config import LoraConfig
from ..errors import NoMatchingPeftModuleError
from ..layers import LoraLayer, create_lora_layer
from ..layers.direct_weight_reads import refuse_direct_weight_reads
from ..targeting import (
    explain_no_match,
    is_target,
    rank_and_alpha,
    resolve_target_names,
    retarget_fused_experts,
    unmatched_entries,
    unused_exclusions,
    warn_unused_patterns,
)
from ..targeting.condense import condense_target_modules
from ..targeting.layer_range import check_layers_in_range
from ..tokens import TrainableTokensWrapper, wrap_trainable_tokens
from .adapter_size import check_adapter_fits
from .inject_parameters import inject_parameters
from .modules_to_save import ModulesToSaveWrapper


def split_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent module, attribute name) of the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def candidate_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """named_modules() without the internals of LoRA layers, modules_to_save and trainable-token wrappers."""
    out: list[tuple[str, nn.Module]] = []
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        out.append((name, module))
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper)):
            skip_prefixes.append(name + ".")
    return out


NOT_IMPLEMENTED_SETTINGS: dict[str, Callable[[LoraConfig], bool]] = {}
"""Config settings lorakit reads and writes back but cannot apply yet; injecting such a config raises rather than
silently training something else. A feature that lands removes its entry."""


def check_settings_implemented(config: LoraConfig) -> None:
    asked = [name for name, is_set in NOT_IMPLEMENTED_SETTINGS.items() if is_set(config)]
    if asked:
        values = ", ".join(f"{name}={getattr(config, name)!r}" for name in asked)
        raise ValueError(f"lorakit cannot apply {values} yet; remove the setting(s) or use peft for this adapter.")


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Module paths to adapt; resolves None / 'all-linear' into config.target_modules first (as PEFT does)."""
    config.target_modules = condense_target_modules(
        resolve_target_names(model, config), (n for n, _ in model.named_modules())
    )
    if config.target_parameters and not config.target_modules:
        return []  # parameters only
    modules = candidate_modules(model)
    check_layers_in_range(config, (n for n, _ in modules))
    names = [name for name, _ in modules if name and is_target(config, name)]
    if not names and config.target_parameters:
        return []  # inject_lora decides, once the parameters are matched too
    if not names:
        raise NoMatchingPeftModuleError(explain_no_match(config, modules))
    missing = unmatched_entries(config, (n for n, _ in modules))
    if missing:
        warnings.warn(f"target_modules entries {missing} match no module of the model; they are ignored.", stacklevel=4)
    unused = unused_exclusions(config, (n for n, _ in modules))
    if unused:
        warnings.warn(
            f"exclude_modules entries {unused} match no module of the model; they exclude nothing.", stacklevel=4
        )
    return names


def inject_lora(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str,
    *,
    low_cpu_mem_usage: bool = False,
    autocast_adapter_dtype: bool = True,
) -> list[str]:
    """Add adapter ``adapter_name`` to every targeted module of ``model``; returns the adapted module paths."""
    check_settings_implemented(config)
    asked_modules = config.target_modules
    retargeted = retarget_fused_experts(model, config)
    targets = find_targets(model, config)
    refuse_direct_weight_reads(model, targets)  # modules a model reads by weight (Mamba's out_proj): LoRA skipped
    # Build every new layer before touching the model, so an unsupported module leaves the model as it was.
    modules = {name: model.get_submodule(name) for name in targets}
    saved = [n for n, m in modules.items() if isinstance(m, ModulesToSaveWrapper)]
    if saved:
        owners = sorted(modules[saved[0]].modules_to_save)
        raise ValueError(
            f"Target module(s) {saved} are in modules_to_save of adapter(s) {owners} "
            "(trained in full), so they cannot also get LoRA; remove them from target_modules or use exclude_modules."
        )
    tokens = [n for n, m in modules.items() if isinstance(m, TrainableTokensWrapper)]
    if tokens:
        raise ValueError(
            f"Target module(s) {tokens} have trainable tokens of adapter(s) {modules[tokens[0]].adapters}; a module "
            "gets either LoRA or trainable tokens, not both. Remove them from target_modules or use exclude_modules."
        )
    check_adapter_fits(modules, lambda path: rank_and_alpha(config, path)[0], adapter_name)
    layers = {n: m if isinstance(m, LoraLayer) else create_lora_layer(m, config, n) for n, m in modules.items()}
    for name, layer in layers.items():
        module = modules[name]
        r, alpha = rank_and_alpha(config, name)
        layer.update_layer(
            adapter_name,
            r,
            alpha,
            config,
            module_name=name,
            low_cpu_mem_usage=low_cpu_mem_usage,
            autocast_adapter_dtype=autocast_adapter_dtype,
        )
        if layer is not module:
            parent, child = split_parent(model, name)
            _warn_if_never_called(parent, child, name)
            setattr(parent, child, layer)
    try:
        params = inject_parameters(
            model,
            config,
            adapter_name,
            low_cpu_mem_usage=low_cpu_mem_usage,
            autocast_adapter_dtype=autocast_adapter_dtype,
        )
    except ValueError as error:
        if not retargeted:
            raise
        raise ValueError(
            f"{error} target_modules={asked_modules!r} names the mixture-of-experts weights that transformers 5 "
            f"fused into the parameters {retargeted} (as PEFT, which refuses the same); list the other modules in "
            "target_modules to adapt them without the experts and router."
        ) from error
    _check_something_targeted(model, config, targets, params)
    warn_unused_patterns(config, targets + params)
    wrap_trainable_tokens(model, config, adapter_name, autocast_adapter_dtype)
    return targets + params


def _warn_if_never_called(parent: nn.Module, child: str, name: str) -> None:
    """nn.MultiheadAttention reads out_proj's weight but never calls it: a LoRA layer there changes nothing (PEFT
    wraps it all the same, e.g. with 'all-linear'; the adapter is kept for file compatibility, with this warning)."""
    if isinstance(parent, nn.MultiheadAttention) and child == "out_proj":
        owner = name.rpartition(".")[0]
        warnings.warn(
            f"Target {name!r} is the out_proj of nn.MultiheadAttention {owner!r}, whose forward torch never calls: "
            f"its LoRA adapter has no effect (as in PEFT). Target {owner!r} itself (LoRA on in_proj and out_proj) "
            "or exclude it with exclude_modules.",
            stacklevel=5,
        )


def _check_something_targeted(model: nn.Module, config: LoraConfig, modules: list[str], params: list[str]) -> None:
    """With target_parameters, matching no module (or no parameter) only warns as long as something matched."""
    if not config.target_parameters:
        return
    if not modules and not params:
        raise NoMatchingPeftModuleError(
            f"target_parameters {config.target_parameters} match no parameter of the model"
            + (f" and target_modules {config.target_modules!r} no module" if config.target_modules else "")
            + "; a parameter matches by its full path or a dotted suffix (e.g. 'experts.gate_up_proj')."
        )
    if config.target_modules and not modules:
        warnings.warn(
            f"target_modules={config.target_modules!r} were set but no module was matched.",
            RuntimeWarning,
            stacklevel=4,
        )
    if not params:
        warnings.warn(
            f"target_parameters={config.target_parameters} were set but no parameter was matched.",
            RuntimeWarning,
            stacklevel=4,
        )


def wrap_modules_to_save(
    model: nn.Module, names: list[str], adapter_name: str, *, auto_names: tuple[str, ...] = ()
) -> list[str]:
    """Wrap modules whose path is ``m`` or ends with ``.m`` for m in ``names``; warn about user names that match
    nothing (``auto_names``, added by the task type, may be absent)."""
    wrapped: list[str] = []
    found: set[str] = set()
    for name, module in candidate_modules(model):
        hit = next((m for m in names if re.fullmatch(rf"(.*\.)?{re.escape(m)}", name)), None)
        if hit is None or not name or any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, LoraLayer):
            raise TypeError(  # PEFT: TypeError too
                f"modules_to_save cannot be applied to module {name!r}: it is a LoRA layer of adapter(s) "
                f"{sorted(module.adapters)}; a module is either adapted with LoRA or saved in full, pick one."
            )
        if isinstance(module, TrainableTokensWrapper):
            raise ValueError(f"Module {name!r} has trainable tokens and is in modules_to_save; pick one.")
        found.update(m for m in names if re.fullmatch(rf"(.*\.)?{re.escape(m)}", name))  # every entry naming it
        if isinstance(module, ModulesToSaveWrapper):
            module.update(adapter_name)
        else:
            parent, child = split_parent(model, name)
            setattr(parent, child, ModulesToSaveWrapper(module, adapter_name))
        wrapped.append(name)
    missing = [m for m in names if m not in found and m not in auto_names]
    if missing:
        warnings.warn(f"modules_to_save entries {missing} match no module of the model.", stacklevel=3)
    return wrapped
