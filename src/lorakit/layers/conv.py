"""LoRA on nn.Conv1d / Conv2d / Conv3d: A is a conv with the base kernel (in -> r), B a 1x1 conv (r -> out)."""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .base import LoraLayer
from .record import AdapterRecord


class Conv(LoraLayer):
    """y = conv(x, W) + s * conv_1x1(conv(dropout(x), A), B).

    A: (r, in, *k) with the base's kernel, stride, padding and dilation; B: (out, r / groups, 1, ...) with the base's
    groups, so r must be divisible by groups. Merging needs groups == 1 (the delta of a grouped B is dense).
    """

    layer_kind = "conv"

    def __init__(self, base_layer: nn.modules.conv._ConvNd) -> None:
        super().__init__(base_layer, base_layer.in_channels, base_layer.out_channels)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _check_supported(self, adapter_name, record, config, module_name) -> None:
        groups = self.get_base_layer().groups
        if groups > 1:  # PEFT's warning; merging such an adapter raises here
            warnings.warn(
                f"LoRA adapter added to ConvNd layer with groups > 1 ({module_name!r}, groups={groups}). Merging is "
                "not supported.",
                stacklevel=5,
            )
        if record.r % groups:
            raise ValueError(
                f"Conv layer {module_name!r} has groups={groups}; its LoRA rank must be divisible by it, "
                f"got r={record.r}."
            )

    def _create_factors(self, name: str, record: AdapterRecord) -> None:
        base = self.get_base_layer()
        conv = type(base)
        ones = (1,) * (base.weight.dim() - 2)
        # dilation and padding_mode follow the base so that the merged weight gives the same output as the adapter
        # (PEFT passes neither: dilated convs then fail and padded borders differ after merging)
        self.lora_A[name] = conv(
            self.in_features,
            record.r,
            base.kernel_size,
            base.stride,
            base.padding,
            dilation=base.dilation,
            bias=False,
            padding_mode=base.padding_mode,
        )
        self.lora_B[name] = conv(record.r, self.out_features, ones, ones, groups=base.groups, bias=record.lora_bias)

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def _weight_to_2d(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.reshape(weight.shape[0], -1)

    def _weight_from_2d(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(self.get_base_layer().weight.shape)

    def _check_mergeable(self, adapter_name: str) -> None:
        if self.get_base_layer().groups > 1:
            raise ValueError(
                f"Cannot merge adapter {adapter_name!r} into a grouped conv (groups={self.get_base_layer().groups}): "
                "its delta is dense. Keep the adapter unmerged."
            )

    def base_weight_2d(self) -> torch.Tensor:
        if self.get_base_layer().groups > 1:
            raise ValueError("This init method needs the base weight as a matrix, which a grouped conv does not have.")
        return super().base_weight_2d()

    def _lora_term(self, name: str, x: torch.Tensor) -> torch.Tensor:
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(lora_a.weight.dtype))
        # (N, in, *S) -> (N, r, *S') -> (N, out, *S')
        return lora_b(lora_a(x)) * self.adapters[name].scaling
