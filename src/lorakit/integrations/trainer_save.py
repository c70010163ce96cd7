"""The adapter's tensors, whole, when a Trainer saves under FSDP or DeepSpeed (accelerate shards the parameters).

transformers' Trainer gathers the *whole model* to save under FSDP with a full state dict, saves nothing but shards
with a sharded one, and under DeepSpeed ZeRO-3 gathers only what ``peft.PeftModel`` marks (peft users get adapter
files of 40 bytes when that fails). ``gather_for_save`` gathers exactly what the adapter files need, on every rank
(the calls are collectives), for ``save_pretrained(..., state_dict=...)`` on the main process:

- FSDP2 (``fully_shard``; parameters are DTensor shards): ``gather_adapter_state_dict`` (only the adapter tensors).
- FSDP1 (``FullyShardedDataParallel``): the full state dict, offloaded to CPU on rank 0 (FSDP1 cannot gather a
  subset by name); the adapter keys are selected from it by ``save_pretrained``.
- DeepSpeed ZeRO-3: the adapter parameters are gathered with ``deepspeed.zero.GatheredParameters`` and read inside
  it. ZeRO-1/2 keep whole parameters on every rank and need nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..peft_model import PeftModel
from .distributed import gather_adapter_state_dict


def _is_fsdp1(wrapped: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(m, FullyShardedDataParallel) for m in wrapped.modules())


def _fsdp1_full_state_dict(wrapped: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, FullStateDictConfig(True, True)):
        state = wrapped.state_dict()
    prefix = "module."
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def _adapter_parameters(model: PeftModel) -> list[nn.Parameter]:
    markers = tuple(f".{name}." for name in model.peft_config)
    return [p for n, p in model.named_parameters() if p.requires_grad or any(m in n for m in markers)]


def _zero3_state_dict(model: PeftModel) -> dict[str, torch.Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters(_adapter_parameters(model), modifier_rank=None):
        return gather_adapter_state_dict(model)


def gather_for_save(trainer: Any, model: PeftModel) -> dict[str, torch.Tensor] | None:
    """The state dict to save ``model``'s adapters from, gathered across ranks; None when nothing is sharded."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        stage = trainer.accelerator.state.deepspeed_plugin.zero_stage
        return _zero3_state_dict(model) if stage == 3 else None
    if not getattr(trainer, "is_fsdp_enabled", False):
        return None
    if _is_fsdp1(trainer.model_wrapped):
        return _fsdp1_full_state_dict(trainer.model_wrapped)
    return gather_adapter_state_dict(model)
