"""The scope of one call of a patched peft model: what lorakit's per-call batches need, opened by forward hooks.

lorakit's own models open ``kernels.factor_casts.model_call`` in ``LoraModel.forward``; inside it the fused layers
batch their factor casts, shared-input groups (q/k/v, gate/up: one node) form, and DoRA's small ops run per group of
layers. A peft model's forward is peft's, so the patch opens the same scope with a forward pre-hook on the
transformers model that holds the LoRA layers (every peft forward and every ``generate`` step calls it) and closes
it with a forward hook registered ``always_call=True`` (run also when the forward raises). The scope's state lives
in a holder kept beside the model (a weak-keyed table), never in the model's ``__dict__``, so the model pickles and
deep-copies as before; a copy opens scopes of its own.

The scope also carries the mixed-batch routing of the call: peft hands every layer the same ``adapter_names`` list
(its pre-forward hooks), so the routing and the kernels' per-call plans are made once per model call, and die with it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from ..kernels.factor_casts import current, model_call
from ..routing import BatchRouting

_LOCAL = threading.local()  # this thread's open scopes: a stack of (module, context manager)
_HOLDERS: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


class _Holder:
    """The owner of a patched model's per-call batches (``model_call`` keeps them in its ``__dict__``)."""


class RoutingCache:
    """The routing of the call in progress, made from the first layer's ``adapter_names`` (a ``FactorCasts``
    extension: ``begin`` / ``end`` run with the model call)."""

    def __init__(self) -> None:
        self.begin()

    def begin(self) -> None:
        self.names: tuple[str, ...] | None = None
        self.routing: BatchRouting | None = None

    def end(self) -> None:
        self.begin()

    def routing_for(self, adapter_names: Sequence[str]) -> BatchRouting:
        names = tuple(adapter_names)
        if self.routing is None or names != self.names:
            self.names, self.routing = names, BatchRouting.from_names(names)
        return self.routing


def call_routing(adapter_names: Sequence[str]) -> BatchRouting:
    """The routing of ``adapter_names`` for this model call (one per call; a fresh one outside a scope)."""
    casts = current()
    if casts is None:
        return BatchRouting.from_names(list(adapter_names))
    cache = casts.extensions.get("peft_routing")
    if cache is None:
        cache = casts.extensions["peft_routing"] = RoutingCache()
    return cache.routing_for(adapter_names)


def _open(module: nn.Module, args: tuple) -> None:
    holder = _HOLDERS.get(module)
    if holder is None:
        holder = _HOLDERS[module] = _Holder()
    scope = model_call(holder)
    scope.__enter__()
    stack = _LOCAL.__dict__.setdefault("open", [])
    stack.append((module, scope))


def _close(module: nn.Module, args: tuple, output: Any) -> None:
    stack = _LOCAL.__dict__.get("open")
    if stack and stack[-1][0] is module:
        stack.pop()[1].__exit__(None, None, None)


def install(root: nn.Module) -> bool:
    """Open a scope around every call of ``root`` (no-op when already installed); True if hooks were added."""
    if installed(root):
        return False
    root.register_forward_pre_hook(_open)
    root.register_forward_hook(_close, always_call=True)
    return True


def installed(module: nn.Module) -> bool:
    return any(hook is _open for hook in module._forward_pre_hooks.values())


def remove(module: nn.Module) -> bool:
    """Remove the scope hooks from ``module``; True if there were any."""
    found = False
    for hooks, extras in (
        (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
        (module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called)),
    ):
        for key, hook in list(hooks.items()):
            if hook is _open or hook is _close:
                del hooks[key]
                for extra in extras:
                    extra.pop(key, None)
                found = True
    return found
