"""LoRA on nn.Linear and transformers' Conv1D (weight stored (in, out): fan_in_fan_out)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..kernels.linear_dispatch import fast_term, fused_forward
from .base import LoraLayer
from .record import AdapterRecord


class Linear(LoraLayer):
    """y = W x + b + s * B A dropout(x), with A: (r, in), B: (out, r)."""

    layer_kind = "linear"

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        weight = base_layer.weight
        out_features, in_features = weight.shape[::-1] if fan_in_fan_out else weight.shape
        if hasattr(base_layer, "in_features") and hasattr(base_layer, "out_features"):
            in_features, out_features = base_layer.in_features, base_layer.out_features
        super().__init__(base_layer, in_features, out_features)
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create_factors(self, name: str, record: AdapterRecord) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, record.r, bias=False)
        self.lora_B[name] = nn.Linear(record.r, self.out_features, bias=record.lora_bias)

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _weight_to_2d(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    def _weight_from_2d(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.T if self.fan_in_fan_out else matrix

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The fused node of ``lorakit.kernels`` when it applies (one plain adapter on a plain nn.Linear; same
        math), else the reference path of ``LoraLayer.forward``."""
        fused = fused_forward(self, x, args, kwargs)
        return fused if fused is not None else super().forward(x, *args, **kwargs)

    def _lora_term(self, name: str, x: torch.Tensor) -> torch.Tensor:
        fast = fast_term(self, name, x)  # activation dtype, no float32 copy of x; None -> reference below
        return fast if fast is not None else self._reference_term(name, x)

    def _reference_term(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """PEFT's math: x cast to the adapter's dtype, s * B(A(dropout(x))) in that dtype (the caller casts back).

        Args:
            x: (..., in)
        Returns:
            (..., out) in the adapter's dtype
        """
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(lora_a.weight.dtype))
        # (..., in) @ (in, r) -> (..., r) @ (r, out) -> (..., out)
        return lora_b(lora_a(x)) * self.adapters[name].scaling
