"""The per-model switch of the fused loss: its options and the fallback reasons already warned about."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field


@dataclass
class FusedLossSettings:
    """``chunk_size``: tokens per chunk (None: as many as keep one chunk's logits near 64 MiB of float32);
    ``use_liger``: on CUDA, Liger Kernel's fused linear cross-entropy for a plain Linear head when installed."""

    chunk_size: int | None = None
    use_liger: bool = True
    warned: set[str] = field(default_factory=set)

    def fall_back(self, reason: str) -> None:
        """Warn once per reason that this forward takes the model's own path (full logits)."""
        if reason in self.warned:
            return
        self.warned.add(reason)
        warnings.warn(
            f"lorakit fused loss: {reason}; this forward computes the full logits with the model's own forward.",
            stacklevel=4,
        )
