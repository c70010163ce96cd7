"""LoRA on ``nn.MultiheadAttention``, in PEFT's layout: this wrapper's ``lora_A`` (r, E) / ``lora_B`` (3E, r) adapt
``in_proj_weight`` (3E, E), and ``out_proj`` is wrapped in place by a nested LoRA ``Linear`` (E -> E).

Neither projection is called as a module by torch's attention: ``in_proj_weight`` is a bare parameter and
``out_proj``'s forward is never run (only its weight and bias are read). So no adapter can add a term to an output;
each forward instead runs the attention with the adapted weights ``W + s B A`` built with autograd (gradients reach A
and B), through ``torch.func.functional_call``: nothing is replaced or re-registered on the module.

Each projection is its own LoRA layer for merging: ``merge``/``unmerge``/``get_delta_weight`` of this wrapper act on
``in_proj_weight``, the nested ``out_proj`` layer on its weight; the model's ``merge_adapter``/``merge_and_unload``
visit both. (PEFT 0.21 adds out_proj's delta twice in its forward and merge, see ``docs/features.md``; lorakit adds
it once: same checkpoints, the LoRA math.)
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch.func import functional_call

from ..routing import current_routing
from .base import LoraLayer
from .linear import Linear
from .record import AdapterRecord

if TYPE_CHECKING:
    from ..config import LoraConfig


def adapted_weight(layer: LoraLayer) -> torch.Tensor | None:
    """W + sum_i s_i B_i A_i over ``layer``'s active adapters that are not merged, in W's dtype, differentiable in
    A and B; None when there is none (the base weight is used as it is).

    Returns:
        (out, in), the layer's weight layout
    """
    pending = [n for n in layer.active_adapters if n in layer.adapters and n not in layer.merged_adapters]
    if not pending:
        return None
    weight = layer.weight
    for name in pending:
        weight = weight + layer.get_delta_weight(name).to(weight.dtype)  # (out, r) @ (r, in) -> (out, in)
    return weight


class MultiheadAttention(LoraLayer):
    """q, k, v = x W_in'^T + b_in with W_in' = W_in + s B A (A: (r, E), B: (3E, r)); out = o W_out'^T + b_out with
    out_proj's own adapters. Refused as in PEFT: separate q/k/v weights (kdim/vdim != embed_dim), an out_proj that is
    not an nn.Linear, variants (DoRA, aLoRA, Arrow), mixed-adapter batches; also lora_bias (PEFT accepts it but never
    applies in_proj's bias). ``lora_dropout`` is not applied (there is no separate LoRA path), with a warning."""

    layer_kind = "mha"

    def __init__(self, base_layer: nn.MultiheadAttention, module_name: str = "") -> None:
        name = module_name or type(base_layer).__name__
        if not base_layer._qkv_same_embed_dim:
            raise ValueError(
                f"LoRA on MultiheadAttention {name!r} needs one in_proj_weight for query/key/value; this one has "
                f"separate weights (embed_dim={base_layer.embed_dim}, kdim={base_layer.kdim}, vdim={base_layer.vdim})."
            )
        if not isinstance(base_layer.out_proj, nn.Linear):
            raise TypeError(
                f"out_proj of MultiheadAttention {name!r} must be an nn.Linear for LoRA, got "
                f"{type(base_layer.out_proj).__name__}."
            )
        super().__init__(base_layer, base_layer.embed_dim, 3 * base_layer.embed_dim)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        base_layer.out_proj = Linear(base_layer.out_proj)

    @property
    def out_proj_layer(self) -> Linear:
        """The nested LoRA layer on out_proj (the module at ``base_layer.out_proj``)."""
        return self.get_base_layer().out_proj

    @property
    def weight(self) -> torch.Tensor:
        """in_proj_weight (3E, E): the parameter this layer's adapters change."""
        return self.get_base_layer().in_proj_weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.get_base_layer().in_proj_bias

    @property
    def _qkv_same_embed_dim(self) -> bool:
        """The base's flag, but False while an unmerged adapter is applied: torch's fused encoder path
        (``TransformerEncoderLayer``/``TransformerEncoder`` in eval) reads the base weights directly, so it would skip
        the adapters silently; this is the flag it checks before taking that path."""
        base_flag = self.get_base_layer()._qkv_same_embed_dim
        return base_flag and not self._applies_adapters()

    def _applies_adapters(self) -> bool:
        """True when a forward would change a weight (an active, unmerged adapter on in_proj or out_proj)."""
        if self._disable_adapters:
            return False
        return any(
            n in layer.adapters and n not in layer.merged_adapters
            for layer in (self, self.out_proj_layer)
            for n in layer.active_adapters
        )

    def _check_supported(self, adapter_name: str, record: AdapterRecord, config: LoraConfig, module_name: str) -> None:
        from ..variants import REQUESTED_BY_CONFIG, VARIANTS

        asked = sorted(
            {n for n, wants, _ in VARIANTS if wants(config)} | {n for n, w in REQUESTED_BY_CONFIG.items() if w(config)}
        )
        if asked:
            raise ValueError(
                f"MultiheadAttention {module_name!r} does not support the {', '.join(asked)} variant; only plain LoRA "
                "(as PEFT). Exclude the module or drop the setting."
            )
        if record.lora_bias:
            raise ValueError(
                f"lora_bias=True is not supported on MultiheadAttention {module_name!r} (PEFT creates but never "
                "applies in_proj's LoRA bias)."
            )
        if record.dropout > 0:
            warnings.warn(
                f"lora_dropout={record.dropout} is not applied on MultiheadAttention {module_name!r}: its "
                "projections run inside torch's attention with the adapted weights, there is no separate LoRA path "
                "to drop (PEFT ignores it there too).",
                stacklevel=4,
            )

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: LoraConfig, **kwargs: Any) -> None:
        """Add the adapter to in_proj (here) and to out_proj (the nested Linear), with the same settings."""
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)
        self.out_proj_layer.update_layer(adapter_name, r, lora_alpha, config, **kwargs)

    def _create_factors(self, name: str, record: AdapterRecord) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, record.r, bias=False)
        self.lora_B[name] = nn.Linear(record.r, self.out_features, bias=False)

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[name].weight, self.lora_B[name].weight

    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """torch's attention with the adapted in_proj and out_proj weights; arguments as nn.MultiheadAttention's.

        Args:
            query: (L, N, E), or (N, L, E) with batch_first
        Returns:
            (attention output shaped like query, attention weights or None)
        """
        if current_routing() is not None:
            raise TypeError("lorakit's MultiheadAttention does not support mixed adapter batches (adapter_names).")
        out_proj = self.out_proj_layer
        if self._disable_adapters:
            for layer in (self, out_proj):  # out_proj's forward never runs, so it cannot unmerge itself
                if layer.merged:
                    layer.unmerge()
            return self.base_layer(query, *args, **kwargs)
        weights = {"in_proj_weight": adapted_weight(self)}
        if not out_proj.disable_adapters:
            weights["out_proj.base_layer.weight"] = adapted_weight(out_proj)
        weights = {k: w for k, w in weights.items() if w is not None}
        if not weights:
            return self.base_layer(query, *args, **kwargs)
        return functional_call(self.base_layer, weights, (query, *args), kwargs, strict=False)
