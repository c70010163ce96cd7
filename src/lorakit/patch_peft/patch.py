"""``patch_peft`` / ``unpatch_peft``: switch a peft model's LoRA Linears to lorakit's fused nodes and back."""

from __future__ import annotations

import warnings

import torch.nn as nn

from . import scope
from .patched_class import is_patched, patched_class
from .versions import TESTED_PEFT_VERSIONS, missing_attributes, peft_api
from .view import VIEW_KEY


def _scope_root(model: nn.Module, api) -> nn.Module:
    """The transformers model under peft's wrappers (PeftModel -> LoraModel -> model), whose every call (forward or
    generate step) opens the per-call scope; the model itself when adapters were attached to it directly."""
    root = model
    if isinstance(root, api.peft_model):
        root = root.base_model
    if isinstance(root, api.base_tuner):
        root = root.model
    return root


def patch_peft(model: nn.Module) -> nn.Module:
    """Run ``model``'s peft LoRA Linears through lorakit's fused nodes; everything else stays peft's.

    Args:
        model: a ``peft.PeftModel`` (e.g. ``trainer.model`` of a TRL trainer built with ``peft_config``), a
            ``LoraModel``, or a transformers model with peft LoRA adapters attached
    Returns:
        ``model`` itself (patched in place; patching again is a no-op, and also patches LoRA layers added since)

    Raises TypeError for a non-module, ValueError when the model has no peft LoRA Linear, RuntimeError when a
    layer lacks an attribute the patch reads (another peft version); warns for an untested peft version.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_peft expects a peft model (torch.nn.Module); got {type(model).__name__}.")
    api = peft_api()
    layers = [m for m in model.modules() if type(m) is api.linear or is_patched(m)]
    if not layers:
        found = sorted({type(m).__name__ for m in model.modules() if isinstance(m, api.lora_layer)})
        raise ValueError(
            f"patch_peft found no peft LoRA Linear layer in {type(model).__name__}; "
            + (f"its peft LoRA layers are {found}, which keep peft's forward." if found else "it has no peft adapters.")
        )
    broken = {name: missing_attributes(m) for name, m in model.named_modules() if type(m) is api.linear}
    broken = {name: missing for name, missing in broken.items() if missing}
    if broken:
        name, missing = next(iter(broken.items()))
        raise RuntimeError(
            f"patch_peft cannot patch peft {api.version}: {len(broken)} LoRA layers lack attributes it reads, e.g. "
            f"{name!r} lacks {missing}. Tested with peft {', '.join(TESTED_PEFT_VERSIONS)}; nothing was patched."
        )
    for layer in layers:
        if type(layer) is api.linear:
            layer.__class__ = patched_class(api.linear)
    own = [name for name, m in model.named_modules() if is_patched(m) and "forward" in m.__dict__]
    if own:
        warnings.warn(
            f"patch_peft: {len(own)} LoRA layers (e.g. {own[0]!r}) carry their own instance-level forward (an "
            "accelerate hook?), which is called instead of the class's: they keep computing as before, unpatched.",
            stacklevel=2,
        )
    scope.install(_scope_root(model, api))
    return model


def unpatch_peft(model: nn.Module) -> nn.Module:
    """Give every patched LoRA layer of ``model`` peft's forward back and remove the per-call hooks; returns
    ``model``. Exactly undoes ``patch_peft`` (a model that was never patched is returned unchanged, with a warning).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch_peft expects a peft model (torch.nn.Module); got {type(model).__name__}.")
    found = False
    for module in model.modules():
        if is_patched(module):
            module.__class__ = type(module)._lorakit_peft_base
            module.__dict__.pop(VIEW_KEY, None)
            found = True
        found = scope.remove(module) or found
    if not found:
        warnings.warn(f"unpatch_peft: {type(model).__name__} has no layer patched by lorakit.patch_peft.", stacklevel=2)
    return model
