"""The reference model of preference and RL trainers, without a second copy of the base: the policy itself with its
adapters switched off (or its frozen ``ref`` adapter switched on), as peft users get from TRL.

TRL's DPO/GRPO/... trainers score every batch under a reference model. For a peft model TRL disables the adapter (a
fresh adapter) or activates a frozen ``ref`` copy of it (an adapter trained before); for any other model it loads a
second full model from ``config._name_or_path`` (twice the memory, and the network for a Hub id).
``AdapterReference`` gives TRL an object to call in place of that second model: it owns no parameter, holds the policy
outside its module tree (so dropout changes, ``.to()`` or a DDP/FSDP wrap of the reference never reach the policy)
and runs the policy in reference mode for the duration of one call.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from ...peft_model import PeftModel

REF_ADAPTER = "ref"


@contextlib.contextmanager
def reference_mode(policy: PeftModel, adapter_name: str | None) -> Iterator[None]:
    """Inside the block ``policy`` computes the reference: adapters disabled (``adapter_name=None``) or only the frozen
    ``adapter_name`` active. The previous active adapters and trainability come back on exit, even on errors."""
    if adapter_name is None:
        with policy.disable_adapter():
            yield
        return
    previous = list(policy.active_adapters)
    policy.set_adapter(adapter_name, inference_mode=True)
    try:
        yield
    finally:
        policy.set_adapter(previous if len(previous) > 1 else previous[0])


def add_reference_adapter(policy: PeftModel, source: str) -> str:
    """Add a frozen ``ref`` adapter that copies ``source`` (an adapter trained before the run), as TRL does for peft
    models; returns its name. An existing ``ref`` adapter is used as it is."""
    if REF_ADAPTER in policy.peft_config:
        return REF_ADAPTER
    if source not in policy.peft_config:
        raise ValueError(
            f"Cannot build the reference adapter: adapter {source!r} does not exist; the model has "
            f"{sorted(policy.peft_config)}."
        )
    policy.add_adapter(REF_ADAPTER, copy.deepcopy(policy.peft_config[source]))
    params = dict(policy.named_parameters())
    marker, target = f".{source}.", f".{REF_ADAPTER}."
    with torch.no_grad():
        for name, param in params.items():
            if marker in name and name.replace(marker, target) in params:
                params[name.replace(marker, target)].copy_(param)
    for name, param in params.items():
        if target in name:
            param.requires_grad_(False)
    return REF_ADAPTER


class AdapterReference(nn.Module):
    """``policy`` in reference mode, callable like a model: ``ref(**batch)`` == ``policy(**batch)`` with the adapters
    disabled (``adapter_name=None``) or with only ``adapter_name`` active.

    No parameters or buffers of its own (``state_dict()`` lists the reference weights, for TRL's cache fingerprint);
    attributes it lacks (``config``, ``generation_config``, ``lm_head``, ``device``...) are read from the policy's
    base model.
    """

    def __init__(self, policy: PeftModel, adapter_name: str | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "policy", policy)  # not a submodule: the reference owns nothing
        self.adapter_name = adapter_name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with reference_mode(self.policy, self.adapter_name):
            return self.policy(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "policy").get_base_model(), name)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The weights the reference computes with: the base model's, plus the ``ref`` adapter's if it is used."""
        keep = (lambda key: "lora_" not in key) if self.adapter_name is None else (lambda key: True)
        return {k: v for k, v in self.policy.get_base_model().state_dict(*args, **kwargs).items() if keep(k)}

    def extra_repr(self) -> str:
        mode = "adapters disabled" if self.adapter_name is None else f"adapter {self.adapter_name!r}"
        return f"policy={type(self.policy).__name__}, {mode}"


def shares_storage(model: nn.Module, other: nn.Module) -> bool:
    """Whether any parameter or buffer of ``other`` uses memory of ``model``'s (the same base module, a view)."""
    ours = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()] if t.numel()}
    return any(t.numel() and t.untyped_storage().data_ptr() in ours for t in [*other.parameters(), *other.buffers()])
