"""One record per adapter on a layer: its hyper-parameters and flags, instead of parallel dicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

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

    @property
    def base_scaling(self) -> float:
        return lora_scaling(self.r, self.lora_alpha, self.use_rslora)

    @property
    def scaling(self) -> float:
        """Effective multiplier of B @ A: base scaling times the runtime scale (set_scale / scale_layer)."""
        return self.base_scaling * self.scale
