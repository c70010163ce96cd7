"""Where a TRL trainer meets a lorakit model: the three calls its constructor makes that must see the adapter.

TRL recognises adapter models with ``isinstance(model, peft.PeftModel)``; a lorakit model is not one (lorakit never
imports peft), so inside a TRL constructor three module-level helpers would do the wrong thing with it:

- ``add_fused_lm_head(model)`` patches ``model.forward`` to run ``model.base_model`` as the *backbone* (transformers'
  meaning). On a lorakit model ``base_model`` is the LoraModel (PEFT's meaning), so the first step fails. It must
  patch the base model inside, as TRL does for peft models.
- ``create_model_from_path(id)`` loads the policy (when TRL is given a model id) and, for trainers with a reference
  model, a second full copy of the base. With a lorakit policy the reference is the policy itself in reference mode
  (``AdapterReference``); with a model id and a lorakit ``peft_config`` the loaded policy gets the adapter at once.
- ``prepare_deepspeed`` / ``prepare_fsdp`` would wrap that reference in an engine of its own; it has no parameters
  and runs through the policy's engine, so it stays as it is.

``constructor_seam`` swaps those names in the trainer's own TRL modules for the length of the constructor call only,
under a lock, and puts the originals back on exit (errors included); nothing of TRL changes outside that call.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from ...peft_model import PeftModel
from ..transformers import lorakit_model
from .reference import AdapterReference

_LOCK = threading.RLock()


@dataclass
class SeamState:
    """What one constructor call needs: how to wrap a policy loaded from an id, how to build the reference."""

    wrap_policy: Callable[[nn.Module], PeftModel] | None
    make_reference: Callable[[PeftModel], AdapterReference]
    policy: PeftModel | None = None


def _fused_head(original: Callable[..., Any], state: SeamState) -> Callable[..., Any]:
    def add_fused_lm_head(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if isinstance(model, AdapterReference):
            return None  # it calls the policy, whose base model gets the fused head below
        inner = lorakit_model(model)
        return original(inner.get_base_model() if inner is not None else model, *args, **kwargs)

    return add_fused_lm_head


def _create_model(original: Callable[..., Any], state: SeamState) -> Callable[..., Any]:
    def create_model_from_path(*args: Any, **kwargs: Any) -> Any:
        if state.policy is None and state.wrap_policy is not None:
            state.policy = state.wrap_policy(original(*args, **kwargs))
            return state.policy
        if state.policy is None:
            return original(*args, **kwargs)  # no lorakit policy: TRL's own behaviour
        return state.make_reference(state.policy)

    return create_model_from_path


def _keep_reference(original: Callable[..., Any], state: SeamState) -> Callable[..., Any]:
    def prepare(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return model if isinstance(model, AdapterReference) else original(model, *args, **kwargs)

    return prepare


_REPLACEMENTS: dict[str, Callable[[Callable[..., Any], SeamState], Callable[..., Any]]] = {
    "add_fused_lm_head": _fused_head,
    "create_model_from_path": _create_model,
    "prepare_deepspeed": _keep_reference,
    "prepare_fsdp": _keep_reference,
}


def trl_modules(trainer_cls: type) -> list[Any]:
    """The modules of TRL that define ``trainer_cls`` or its bases (where their constructors look names up)."""
    names = {c.__module__ for c in trainer_cls.__mro__ if c.__module__.split(".")[0] == "trl"}
    return [sys.modules[n] for n in sorted(names) if n in sys.modules]


@contextlib.contextmanager
def constructor_seam(trainer_cls: type, state: SeamState) -> Iterator[SeamState]:
    """Swap TRL's helpers for lorakit-aware ones in ``trainer_cls``'s modules while the block runs (see module doc)."""
    with _LOCK:
        saved = []
        try:
            for module in trl_modules(trainer_cls):
                for name, make in _REPLACEMENTS.items():
                    if name in vars(module):
                        saved.append((module, name, vars(module)[name]))
                        setattr(module, name, make(vars(module)[name], state))
            yield state
        finally:
            for module, name, original in reversed(saved):
                setattr(module, name, original)
