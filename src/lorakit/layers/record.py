"""One record per adapter on a layer: its hyper-parameters and flags, instead of parallel dicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..delta import lora_scaling

if TYPE_CHECKING:
    from .variant import LoraVariant


@dataclass
class AdapterRecord:
    """Hyper-parameters of one adapter on one layer. ``scaling`` is derived and may be rescaled at runtime."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    lora_bias: bool = False
    dropout: float = 0.0
    variant: LoraVariant | None = None
    scale: float = field(default=1.0, repr=False)
    # set by lorakit.utils.hotswap.prepare_model_for_compiled_hotswap: a 0-d tensor holding ``scaling``, updated in
    # place, so a compiled graph reads a new alpha without recompiling. None (a Python float) everywhere else.
    scaling_tensor: torch.Tensor | None = field(default=None, repr=False)
    frozen: frozenset[str] = frozenset()  # factors ("A", "B") that never train (MiCA freezes B)

    @property
    def base_scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    @property
    def scaling(self) -> float | torch.Tensor:
        """Effective multiplier of B @ A: base scaling times the runtime scale (set_scale / scale_layer); the pinned
        0-d tensor instead once the model was prepared for compiled hotswapping."""
        if self.scaling_tensor is not None:
            return self.scaling_tensor
        return self.base_scaling * self.scale

    def pin_scaling(self, device: torch.device) -> None:
        """Hold ``scaling`` in a 0-d float32 tensor on ``device`` from now on (for compiled hotswapping)."""
        if self.scaling_tensor is None:
            self.scaling_tensor = torch.tensor(self.base_scaling * self.scale, dtype=torch.float32, device=device)

    def sync_scaling(self) -> None:
        """Write r / lora_alpha / scale into the pinned tensor, in place (no-op when not pinned)."""
        if self.scaling_tensor is not None:
            self.scaling_tensor.fill_(self.base_scaling * self.scale)
