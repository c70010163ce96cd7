"""peft's DoRA on a Linear through lorakit's fused DoRA node (``kernels.dora_linear``).

DoRA (arXiv:2402.09353): y = b + (m / ||W + s B A||) (W + s B A) x, the norm detached (section 4.3), which is what
peft's ``DoraLinearVariant`` / ``DoraLinearLayer`` compute. Here the magnitude is peft's own parameter
(``lora_magnitude_vector[name].weight``, shape (out,)); lorakit's node and its per-call batching of the small
factor ops (``kernels.dora_batch``) run on it unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..kernels.dora_batch import batched_factors
from ..kernels.dora_linear import accumulation_dtype, fused_dora_linear, weight_sq
from ..kernels.dora_triton import use_triton
from ..variants.dora import _FUSED_DTYPES

if TYPE_CHECKING:
    from .versions import PeftApi


class PeftDora:
    """The variant object lorakit's ``linear_dispatch`` calls for a peft DoRA adapter (``fused_linear``)."""

    name = "dora"

    def __init__(self, api: PeftApi) -> None:
        self.api = api

    def fused_linear(
        self,
        layer,
        name: str,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        p: float,
    ) -> torch.Tensor | None:
        """The whole DoRA Linear (base included) in one node, or None for peft's forward.

        Called once ``linear_dispatch`` checked the common conditions (one active adapter, plain nn.Linear base and
        factors, dtype, device, no autocast / hooks). Covers no dropout (none, or eval mode), a frozen W, peft's own
        magnitude module (no hooks) of shape (out,), bfloat16/float32/float64 activations, and not peft's optional
        DoRA caching.

        Args:
            layer: the peft layer's ``PeftLayerView``
            x: (..., in); weight: (out, in); bias: (out,) or None; lora_a: (r, in); lora_b: (out, r)
        Returns:
            (..., out) in x's dtype, or None
        """
        if p != 0.0 or x.dtype not in _FUSED_DTYPES or (weight.requires_grad and torch.is_grad_enabled()):
            return None
        if self.api.dora_caching():
            return None
        holder = layer.__dict__["_modules"]["lora_magnitude_vector"]._modules.get(name)
        if type(holder) is not self.api.dora_layer or holder._forward_hooks or holder._forward_pre_hooks:
            return None
        magnitude = holder.__dict__["_parameters"].get("weight")
        if magnitude is None or magnitude.device != x.device or magnitude.dim() != 1:
            return None
        wsq = weight_sq(layer, weight, accumulation_dtype(x.dtype))
        scaling = layer.adapters[name].scaling
        factors = None
        if not use_triton(x):  # with the model call's other same-shape DoRA layers (``dora_batch``)
            factors = batched_factors(layer, name, (weight, wsq, lora_a, lora_b, magnitude), scaling, x.dtype)
        return fused_dora_linear(x, weight, bias, lora_a, lora_b, magnitude, scaling, wsq, factors)
