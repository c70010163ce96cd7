"""PEFT's warning for adapter tensors that look like unsharded fragments (ZeRO-3 / FSDP not gathered before save)."""

from __future__ import annotations

import warnings

import torch

from ..errors import PeftWarning


def warn_malformed_lora(state_dict: dict[str, torch.Tensor], adapter_name: str) -> None:
    """PeftWarning when a ``lora_A`` / ``lora_B`` tensor (``(r, in)`` / ``(out, r)`` when whole) is 1-D or empty.

    DoRA magnitudes and biases are 1-D by nature and are not checked."""
    bad = [
        (key, tuple(t.shape))
        for key, t in state_dict.items()
        if isinstance(t, torch.Tensor)
        and (".lora_A" in key or ".lora_B" in key)
        and not key.endswith(".bias")
        and (t.dim() < 2 or 0 in t.shape)
    ]
    if not bad:
        return
    preview = ", ".join(f"{key}:{shape}" for key, shape in bad[:3])
    preview += f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
    warnings.warn(
        f"Adapter {adapter_name!r}: {len(bad)} LoRA tensor(s) have invalid shape: {preview}. A 1-D or zero-sized "
        "lora_A / lora_B tensor indicates that DeepSpeed ZeRO-3 / FSDP shards were not gathered before saving, so the "
        "file would be incomplete. Gather first (lorakit.integrations.distributed.gather_adapter_state_dict(model), "
        "deepspeed.zero.GatheredParameters, or FullyShardedDataParallel.summon_full_params).",
        PeftWarning,
        stacklevel=4,
    )
