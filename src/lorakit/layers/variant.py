"""The contract of a LoRA variant (DoRA, aLoRA, Arrow, ...): a strategy object the layer types share.

A layer calls the variant instead of its plain LoRA path; a variant only implements what it changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from .base import LoraLayer


@runtime_checkable
class LoraVariant(Protocol):
    name: str

    def init(self, layer: LoraLayer, adapter_name: str) -> None:
        """Create the variant's extra parameters once A and B are initialised (on the meta device when A and B
        are meta, i.e. with low_cpu_mem_usage, so that loading a checkpoint can fill them)."""

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Return ``result`` (the output so far, same shape as the base output) with this adapter applied."""

    def merged_weight(self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """The base weight with this adapter merged in (float32 in, float32 out, weight layout)."""

    def unmerged_weight(self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """Exact inverse of ``merged_weight``."""


class UnmergeableVariant:
    """Base for variants whose output no single weight reproduces (aLoRA, Arrow): every merge path refuses with the
    variant's own ``check_mergeable`` message before any weight changes."""

    def check_mergeable(self, layer: LoraLayer, adapter_name: str) -> None:
        raise NotImplementedError

    def merged_weight(self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        self.check_mergeable(layer, adapter_name)
        return weight

    def unmerged_weight(self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        self.check_mergeable(layer, adapter_name)
        return weight
