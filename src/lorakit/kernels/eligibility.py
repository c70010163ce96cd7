"""Capability checks shared by the fast paths: when may a fast path stand in for the readable one?

A fast path computes the base layer itself (to fuse it with the adapter) and skips the adapter's submodules, so it
only runs where doing so cannot change behaviour: a plain ``nn.Linear`` base with no hooks or patched forward, plain
``nn.Linear`` factors, a dropout it knows, no autocast, matching dtypes and devices.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules import module as _module_globals


def global_hooks_present() -> bool:
    """Global module hooks (``register_module_forward_hook``) would be skipped by a fused path."""
    return bool(_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks)


def plain_linear(module: nn.Module) -> bool:
    """Exactly ``nn.Linear`` (not a quantised subclass), without hooks or an instance-level forward (accelerate)."""
    state = module.__dict__  # one dict read per check instead of attribute lookups (this runs per layer per call)
    return (
        type(module) is nn.Linear
        and not state["_forward_hooks"]
        and not state["_forward_pre_hooks"]
        and "forward" not in state
    )


def plain_conv1d(module: nn.Module) -> bool:
    """Exactly transformers' ``Conv1D`` (GPT-2 style: weight (in, out), y = x W + b), without hooks or an
    instance-level forward."""
    cls = type(module)
    state = module.__dict__
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__ == "transformers.pytorch_utils"
        and not state["_forward_hooks"]
        and not state["_forward_pre_hooks"]
        and "forward" not in state
    )


def dropout_probability(module: nn.Module) -> float | None:
    """The dropout the fast path must apply: 0.0 for Identity / eval-mode Dropout, p for a training Dropout,
    None for anything else (a custom module: use the reference path)."""
    if type(module) is nn.Identity:
        return 0.0
    if type(module) is nn.Dropout and not module._forward_hooks and not module._forward_pre_hooks:
        return float(module.p) if module.training and module.p > 0 else 0.0
    return None


_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def saved_tensor_hooks_active() -> bool:
    """Saved-tensor hooks (non-reentrant checkpointing, offloading) are installed (unknown: assume they are)."""
    return _top_hooks is None or _top_hooks(True) is not None


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_active(device: torch.device) -> bool:
    # the any-device flag first: one C call (~70 ns) instead of ~400 ns for the per-device query in the common case
    if _any_autocast is not None and not _any_autocast():
        return False
    return torch.is_autocast_enabled(device.type)


def autocast_keeps_dtype(x: torch.Tensor) -> bool:
    """Autocast on x's device computes in x's own dtype (a bfloat16 model under bfloat16 autocast, as the
    transformers Trainer's ``bf16=True`` runs it): a fast path may run, with autocast off inside it, and give what
    autocast would (the same dtype for every matmul)."""
    return torch.get_autocast_dtype(x.device.type) == x.dtype
