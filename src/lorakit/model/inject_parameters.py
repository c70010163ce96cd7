"""``target_parameters``: find the nn.Parameters a config names and wrap each in a ParamWrapper (PEFT's rules).

Matching: a parameter's path (module path + "." + parameter name, ignoring wrappers) equals an entry or ends with
"." + entry. Parameters are visited in module order and, within a module, in registration order; each one wraps
the module's current occupant, so the first parameter of a module ends up innermost (``experts.base_layer.lora_A``)
and the last outermost (``experts.lora_A``), as in PEFT. A further adapter joins the existing wrappers, and must
target exactly the same parameters (the nesting decides the saved keys).
"""

from __future__ import annotations

import warnings

import torch.nn as nn

from ..config import LoraConfig
from ..layers import LoraLayer
from ..layers.param_wrapper import ParamWrapper
from ..targeting import rank_and_alpha
from ..targeting.match import matches_any


def _chain(module: nn.Module) -> list[ParamWrapper]:
    """The ParamWrappers nested at one path, outermost first."""
    chain = []
    while isinstance(module, ParamWrapper):
        chain.append(module)
        module = module.base_layer
    return chain


def _matches(key: str, entries: list[str]) -> bool:
    return any(key == e or key.endswith("." + e) for e in entries)


def parameter_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, str]]:
    """(module path, parameter name) of every parameter ``config.target_parameters`` names, in wrapping order.

    Raises ValueError for a parameter on the top-level module, on a module that already carries LoRA from
    ``target_modules``, or one registered through ``torch.nn.utils.parametrize``."""
    from .inject import candidate_modules

    entries = sorted(set(config.target_parameters or []))
    found: list[tuple[str, str]] = []
    for path, module in candidate_modules(model):
        owner = module.get_base_layer() if isinstance(module, LoraLayer) else module
        parametrized = set(getattr(owner, "parametrizations", {}) or {})
        names = [n for n, _ in owner.named_parameters(recurse=False)] + sorted(parametrized)
        for name in names:
            key = f"{path}.{name}" if path else name
            if not _matches(key, entries):
                continue
            if not path:
                raise ValueError(
                    f"target_parameters: {name!r} belongs to the top-level module, which cannot be wrapped."
                )
            if isinstance(module, LoraLayer) and not isinstance(module, ParamWrapper):
                raise ValueError(
                    f"target_parameters: {key!r} belongs to {path!r}, which already carries LoRA from target_modules; "
                    "target the module or its parameter, not both."
                )
            if name in parametrized:
                raise ValueError(
                    f"target_parameters: {key!r} is parametrized (torch.nn.utils.parametrize); lorakit cannot wrap it."
                )
            found.append((path, name))
    return found


def _targets_by_adapter(model: nn.Module) -> dict[str, set[tuple[str, str]]]:
    """Adapter -> the (path, parameter) pairs it already adapts through ParamWrappers."""
    from .inject import candidate_modules

    out: dict[str, set[tuple[str, str]]] = {}
    for path, module in candidate_modules(model):
        for wrapper in _chain(module):
            for name in wrapper.adapters:
                out.setdefault(name, set()).add((path, wrapper.parameter_name))
    return out


def _check_same_targets(model: nn.Module, adapter_name: str, targets: list[tuple[str, str]]) -> None:
    wanted = set(targets)
    for other, pairs in _targets_by_adapter(model).items():
        if other != adapter_name and pairs != wanted:
            mine = sorted(f"{p}.{n}" for p, n in wanted)
            theirs = sorted(f"{p}.{n}" for p, n in pairs)
            raise ValueError(
                "When several adapters use target_parameters they must all target the same parameters (the nesting "
                f"of the wrappers decides the saved keys); adapter {adapter_name!r} targets {mine[:4]}"
                f"{' ...' if len(mine) > 4 else ''}, adapter {other!r} targets {theirs[:4]}"
                f"{' ...' if len(theirs) > 4 else ''}."
            )


def _warn_if_excluded(config: LoraConfig, targets: list[tuple[str, str]]) -> None:
    """exclude_modules applies to target_modules only (as in PEFT); say so when it names a parameter's module, e.g.
    the router ``gate`` that 'all-linear' adapts through ``gate.weight`` on MoE models."""
    named = [f"{p}.{n}" for p, n in targets if matches_any(config.exclude_modules, p)]
    if named:
        warnings.warn(
            f"exclude_modules={config.exclude_modules!r} names the module(s) of {named[:3]}"
            f"{' ...' if len(named) > 3 else ''}, which target_parameters={config.target_parameters} still adapts: "
            "exclude_modules applies to target_modules only (as in PEFT). Leave the parameter out of "
            "target_parameters, or list target_modules instead of 'all-linear' on mixture-of-experts models.",
            stacklevel=5,
        )


def inject_parameters(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str,
    *,
    low_cpu_mem_usage: bool = False,
    autocast_adapter_dtype: bool = True,
) -> list[str]:
    """Add adapter ``adapter_name`` to every parameter ``config.target_parameters`` names; returns their paths."""
    from .inject import split_parent

    if not config.target_parameters:
        return []
    targets = parameter_targets(model, config)
    if targets:
        _check_same_targets(model, adapter_name, targets)
        _warn_if_excluded(config, targets)
    for path, name in targets:
        current = model.get_submodule(path)
        layer = next((w for w in _chain(current) if w.parameter_name == name), None)
        if layer is None:
            layer = ParamWrapper(current, name)
            parent, child = split_parent(model, path)
            setattr(parent, child, layer)
        key = f"{path}.{name}"
        r, alpha = rank_and_alpha(config, key)
        layer.update_layer(
            adapter_name,
            r,
            alpha,
            config,
            module_name=key,
            low_cpu_mem_usage=low_cpu_mem_usage,
            autocast_adapter_dtype=autocast_adapter_dtype,
        )
    return [f"{p}.{n}" for p, n in targets]
