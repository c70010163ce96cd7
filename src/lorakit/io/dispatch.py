"""``device_map`` and accelerate's offload arguments of ``from_pretrained`` / ``load_adapter``.

PEFT accepts them and uses them only to re-dispatch a base model that accelerate offloaded to "cpu" or "disk";
for any other model the adapter's tensors simply follow the layers they wrap. lorakit does the same for the second
case (each adapter is placed on its base layer's device, so it ends up where the base model's own ``device_map``
put that layer) and refuses the first: it has no offload hooks for adapter weights.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

DISPATCH_KWARGS = ("device_map", "max_memory", "offload_folder", "offload_dir", "offload_index")
_DEVICE_MAP_STRINGS = ("auto", "balanced", "balanced_low_0", "sequential")


def pop_dispatch_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove and return the dispatch arguments from ``kwargs``, checking ``device_map``'s type."""
    found = {k: kwargs.pop(k) for k in list(kwargs) if k in DISPATCH_KWARGS}
    device_map = found.get("device_map")
    if device_map is not None and not isinstance(device_map, dict) and device_map not in _DEVICE_MAP_STRINGS:
        raise ValueError(
            f"device_map={device_map!r} is not valid; use one of {list(_DEVICE_MAP_STRINGS)} or a dict "
            "{module name: device}."
        )
    if found.get("offload_dir") is not None and found.get("offload_folder") is not None:
        raise ValueError("Give `offload_dir` or `offload_folder` (its older name), not both.")
    return found


def offloaded_devices(model: nn.Module) -> set[str]:
    """The "cpu"/"disk" entries of an accelerate ``hf_device_map`` that mean offloading: "disk" always, "cpu" when
    other entries are accelerators (a map that is all "cpu" is a plain CPU model). Empty when nothing is offloaded."""
    values = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    offloaded = values & {"disk"}
    if "cpu" in values and values - {"cpu", "disk"}:
        offloaded.add("cpu")
    return offloaded


def check_dispatch(model: nn.Module, dispatch: dict[str, Any]) -> None:
    """Refuse a base model that accelerate offloaded to cpu/disk; otherwise the arguments need no action."""
    offloaded = offloaded_devices(model)
    if offloaded:
        given = sorted(k for k, v in dispatch.items() if v is not None)
        raise ValueError(
            f"The base model is offloaded by accelerate to {sorted(offloaded)} (hf_device_map); lorakit cannot attach "
            f"adapters to offloaded layers{f' (arguments given: {given})' if given else ''}. Load the base model "
            "onto real devices only (e.g. device_map={'': 'cuda:0'} or a map without 'cpu'/'disk')."
        )
