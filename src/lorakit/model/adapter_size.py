"""A rank too large to allocate is refused before anything is allocated, with the size it would need.

PEFT accepts any rank, also r > min(in, out) (wasteful but valid: the product B A then has rank min(in, out)), and
fails in the allocator for sizes the machine cannot hold (``r=2**40``). lorakit keeps every rank PEFT allows that
fits in memory, and refuses an adapter whose factors alone exceed the memory of the device they would live on.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn as nn


def device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of ``device`` (physical RAM for the CPU), or None when unknown (meta, other backends)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def _factor_elements(module: nn.Module, r: int) -> int:
    """r * (in + out) of a module's 2-D view W (out, in): A (r, in) plus B (out, r). Layout-independent (Conv1D's
    (in, out) and an embedding's (num, dim) give the same sum)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2 or weight.shape[0] == 0:
        return 0
    return r * (weight.shape[0] + weight.numel() // weight.shape[0])


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def check_adapter_fits(
    modules: dict[str, nn.Module], rank_of: Callable[[str], int], adapter_name: str, element_size: int = 4
) -> None:
    """Raise ValueError when the LoRA factors for ``modules`` (path -> base module) would exceed the memory of the
    device of the first module's weight; ``rank_of(path)`` gives each module's rank (rank_pattern applied)."""
    sizes = {path: _factor_elements(m, rank_of(path)) * element_size for path, m in modules.items()}
    total = sum(sizes.values())
    weights = [m.weight for m in modules.values() if isinstance(getattr(m, "weight", None), torch.Tensor)]
    if not total or not weights:
        return
    device = weights[0].device
    capacity = device_memory_bytes(device)
    if capacity is None or total <= capacity:
        return
    path = max(sizes, key=sizes.get)
    weight = modules[path].weight
    rank = rank_of(path)
    smallest = min(weight.shape[0], weight.numel() // weight.shape[0])
    raise ValueError(
        f"Adapter {adapter_name!r} needs {_human(total)} for its LoRA factors on {len(sizes)} module(s) but the "
        f"{device.type} device has {_human(capacity)}: e.g. {path!r} (weight {tuple(weight.shape)}) at r={rank} "
        f"needs {_human(sizes[path])}. Choose a smaller r (a rank above min(in, out) = {smallest} "
        "adds no expressiveness)."
    )
