"""DoRA, weight-decomposed low-rank adaptation (arXiv:2402.09353), as a variant shared by every layer type.

Each output channel gets a learnable magnitude m, set at creation to ||W + s B A|| (so the adapter starts as plain
LoRA, a no-op with the default init). The adapted layer computes

    y = b + (m / ||W + s B A||) (W + s B A) x       with the norm detached from the graph (paper, section 4.3)

Norms are taken over every weight axis but the output channel, in the (out, in) view the layer types provide:
Linear rows, transformers Conv1D columns, Embedding columns (one per embedding dimension), Conv (out, in * k...).
Magnitude shapes follow PEFT so checkpoints interchange: Linear/Conv1D (out,), Embedding (embedding_dim,),
ConvNd (1, out, 1, ...). On disk the key is ``...lora_magnitude_vector``; in memory
``...lora_magnitude_vector.<adapter>.weight``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..kernels.dora_batch import batched_factors
from ..kernels.dora_linear import accumulation_dtype, fused_dora_linear, weight_sq
from ..kernels.dora_triton import use_triton
from . import register_variant
from .dora_autograd import DoraLinearFunction, DoraScaleFunction
from .dora_norm import weight_norm, weight_norm_reference

if TYPE_CHECKING:
    from ..config import LoraConfig
    from ..layers.base import LoraLayer

_FUSED_DTYPES = (torch.bfloat16, torch.float32, torch.float64)  # activations the fused Linear node takes

NormFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


class MagnitudeVector(nn.Module):
    """Holds DoRA's magnitude as ``weight`` (PEFT's in-memory key ``lora_magnitude_vector.<adapter>.weight``)."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}"


def _weight_2d(layer: LoraLayer) -> torch.Tensor:
    """The base weight as an (out, in) view without copying; quantised layers dequantise through the layer."""
    weight = layer.get_base_layer().weight
    if weight.dtype.is_floating_point:
        return layer._weight_to_2d(weight.detach())
    return layer.base_weight_2d()


class DoraVariant:
    """One adapter's DoRA on one layer: creates the magnitude, computes the output, merges and unmerges.

    The norm is recomputed each forward from W and the small factors (``dora_norm.weight_norm``: one read of W, no
    identity product, nothing saved for backward); the output goes through a custom autograd function that keeps a
    single activation per layer (``dora_autograd``). On a plain nn.Linear without active dropout the whole layer
    runs as one fused node instead (``fused_linear`` -> ``kernels/dora_linear.py``); this class's ``forward`` is the
    reference it is tested against.
    """

    name = "dora"
    supports_mixed_batch = False

    def __init__(self, layer: LoraLayer, config: LoraConfig) -> None:
        kind = layer.layer_kind
        if kind not in _FORWARDS:
            raise ValueError(
                f"DoRA supports the layer kinds {sorted(_FORWARDS)}; {type(layer).__name__} is of kind {kind!r}."
            )
        groups = getattr(layer.get_base_layer(), "groups", 1)
        if groups > 1:
            raise ValueError(
                f"DoRA on a grouped convolution (groups={groups}) is not supported: its adapted weight has no dense "
                "per-channel norm. Exclude this layer or use plain LoRA for it."
            )
        runtime = getattr(config, "runtime_config", None)
        self.ephemeral_gpu_offload = bool(getattr(runtime, "ephemeral_gpu_offload", False))
        self._forward = _FORWARDS[kind]
        self._merged_norm: torch.Tensor | None = None  # (out,) float32: the norm the last merge divided by

    def __repr__(self) -> str:
        return f"DoraVariant(ephemeral_gpu_offload={self.ephemeral_gpu_offload})"

    # ------------------------------------------------------------------ norms
    def _norm(self, layer: LoraLayer, name: str, weight2d: torch.Tensor, fn: NormFn, offload: bool) -> torch.Tensor:
        """(out,) float32 row norms of ``weight2d + s B A`` on ``weight2d``'s device; with ``offload`` a CPU weight
        is sent to the GPU for the computation (ephemeral_gpu_offload) and the result brought back."""
        a2d, b2d = layer._factors_2d(name)
        scaling = layer.adapters[name].scaling
        home = weight2d.device
        if offload and self.ephemeral_gpu_offload and home.type == "cpu" and torch.cuda.is_available():
            device = torch.device("cuda")
            return fn(weight2d.to(device), a2d.detach().to(device), b2d.detach().to(device), scaling).to(home)
        return fn(weight2d, a2d.detach(), b2d.detach(), scaling)

    def current_norm(self, layer: LoraLayer, name: str) -> torch.Tensor:
        """||W + s B A|| per output channel, (out,) float32, detached: the divisor of the forward."""
        return self._norm(layer, name, _weight_2d(layer), weight_norm, offload=False)

    @staticmethod
    def magnitude_shape(layer: LoraLayer) -> tuple[int, ...]:
        """PEFT's magnitude shapes: (out,) for Linear/Conv1D/Embedding, (1, out, 1, ...) for ConvNd."""
        if layer.layer_kind == "conv":
            return (1, layer.out_features) + (1,) * (layer.get_base_layer().weight.dim() - 2)
        return (layer.out_features,)

    # ------------------------------------------------------------------ protocol
    def init(self, layer: LoraLayer, adapter_name: str) -> None:
        """m = ||W + s B A|| per output channel, in A's dtype and on A's device (meta placeholders on meta)."""
        lora_a, _ = layer._factors(adapter_name)
        shape = self.magnitude_shape(layer)
        if lora_a.is_meta:
            magnitude = torch.empty(shape, dtype=lora_a.dtype, device="meta")
        else:
            norm = self._norm(layer, adapter_name, _weight_2d(layer), weight_norm, offload=True)
            magnitude = norm.reshape(shape).to(device=lora_a.device, dtype=lora_a.dtype)
        layer.lora_magnitude_vector[adapter_name] = MagnitudeVector(magnitude)

    def forward(self, layer: LoraLayer, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` (the base output plus earlier adapters) with this DoRA adapter applied; same shape and dtype."""
        return self._forward(self, layer, adapter_name, x, result)

    def merged_weight(self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """(m / ||W0 + dW||) (W + dW) in the weight's layout, float32.

        W is ``weight`` (which may hold adapters merged before); W0 is the base weight without them, recovered by
        unmerging those adapters in float32, because the norm is the one the forward divides by (as PEFT).
        """
        base = weight
        for earlier in reversed(layer.merged_adapters):
            base = layer._unmerged_weight(earlier, base)
        base2d = layer._weight_to_2d(base)
        norm = self._norm(layer, adapter_name, base2d, weight_norm_reference, offload=True)
        self._merged_norm = norm
        factor = self._magnitude(layer, adapter_name, norm.device) / norm
        delta2d = self._delta_2d(layer, adapter_name, weight.device)
        return layer._weight_from_2d(factor[:, None] * (layer._weight_to_2d(weight) + delta2d)).contiguous()

    def unmerged_weight(self, layer: LoraLayer, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """Exact inverse of ``merged_weight`` (to rounding): W = W' / (m / n) - dW with the n of the merge."""
        if self._merged_norm is None:
            raise RuntimeError(
                f"DoRA adapter {adapter_name!r} was not merged by this layer, so its merge norm is unknown and the "
                "weight cannot be unmerged."
            )
        norm = self._merged_norm.to(weight.device)
        factor = self._magnitude(layer, adapter_name, weight.device) / norm
        delta2d = self._delta_2d(layer, adapter_name, weight.device)
        return layer._weight_from_2d(layer._weight_to_2d(weight) / factor[:, None] - delta2d).contiguous()

    # ------------------------------------------------------------------ fused node (kernels/dora_linear.py)
    def fused_linear(
        self,
        layer: LoraLayer,
        name: str,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        p: float,
    ) -> torch.Tensor | None:
        """The whole DoRA Linear (base included) through ``kernels.dora_linear``, or None for the reference path.

        Called by ``kernels.linear_dispatch.fused_forward`` once it has checked the common conditions (one active
        adapter, plain nn.Linear base and factors, matching dtype and device, no autocast, hooks or routing).
        Covers no dropout (p == 0: none, or eval mode), a frozen weight, a plain magnitude of shape (out,) and
        bfloat16/float32/float64 activations (float16's range is too small for k W with a tiny k).

        Args:
            x: (..., in); weight: (out, in); bias: (out,) or None; lora_a: (r, in); lora_b: (out, r)
        Returns:
            (..., out) in x's dtype, or None
        """
        if p != 0.0 or x.dtype not in _FUSED_DTYPES or (weight.requires_grad and torch.is_grad_enabled()):
            return None
        holder = layer.__dict__["_modules"]["lora_magnitude_vector"]._modules.get(name)
        if type(holder) is not MagnitudeVector or holder._forward_hooks or holder._forward_pre_hooks:
            return None
        magnitude = holder.__dict__["_parameters"]["weight"]
        if magnitude.device != x.device or magnitude.dim() != 1:
            return None
        wsq = weight_sq(layer, weight, accumulation_dtype(x.dtype))
        scaling = layer.adapters[name].scaling
        factors = None
        if not use_triton(x):  # computed with the model call's other same-shape DoRA layers (``dora_batch``)
            factors = batched_factors(layer, name, (weight, wsq, lora_a, lora_b, magnitude), scaling, x.dtype)
        return fused_dora_linear(x, weight, bias, lora_a, lora_b, magnitude, scaling, wsq, factors)

    @staticmethod
    def _magnitude(layer: LoraLayer, name: str, device: torch.device) -> torch.Tensor:
        return layer.lora_magnitude_vector[name].weight.detach().reshape(-1).to(device=device, dtype=torch.float32)

    @staticmethod
    def _delta_2d(layer: LoraLayer, name: str, device: torch.device) -> torch.Tensor:
        return layer._weight_to_2d(layer.get_delta_weight(name).to(device=device, dtype=torch.float32))


# ---------------------------------------------------------------------- forwards per layer kind
def _reuses_base(layer: LoraLayer, name: str) -> bool:
    """W x can be read off the base output when the adapter's dropout does nothing (none, or eval mode)."""
    return isinstance(layer.lora_dropout[name], nn.Identity) or not layer.training


def _first_applied(layer: LoraLayer, name: str) -> bool:
    """Adapter ``name`` is the first one ``LoraLayer.forward`` applies, so the result it gets is the base output."""
    for other in layer._active_adapters:
        if other == name:
            return True
        if other in layer.adapters and other not in layer.merged_adapters:
            return False
    return False


def _again(layer: LoraLayer, name: str, device: str, lora: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """What DoRA's autograd functions call in backward when the caller edited their output in place (they keep the
    output instead of z, and need z again then): x -> the base output for x (and the LoRA term, given ``lora``),
    under the forward's autocast. It holds no tensor (x comes from the function's saved tensors). None, so that z
    is saved instead, where the base output alone is not what the adapter got (another adapter came first)."""
    if not _first_applied(layer, name):
        return None
    enabled, dtype = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)

    def again(x: torch.Tensor):
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            result = layer.base_layer(x)
            return result if lora is None else (result, lora(x))

    return again


def _forward_linear(
    variant: DoraVariant, layer: LoraLayer, name: str, x: torch.Tensor, result: torch.Tensor
) -> torch.Tensor:
    """nn.Linear and transformers Conv1D: x (..., in), result (..., out)."""
    weight2d = _weight_2d(layer)
    norm = variant.current_norm(layer, name)
    magnitude = layer.lora_magnitude_vector[name].weight
    lora_a, lora_b = layer._factors(name)
    scaling = layer.adapters[name].scaling
    if _reuses_base(layer, name):
        again = _again(layer, name, x.device.type)
        return DoraLinearFunction.apply(x, result, None, lora_a, lora_b, magnitude, norm, scaling, layer.bias, again)
    x = layer.lora_dropout[name](x)
    wx = torch.nn.functional.linear(x.to(weight2d.dtype), weight2d)  # (..., in) -> (..., out), no bias
    return DoraLinearFunction.apply(x, result, wx, lora_a, lora_b, magnitude, norm, scaling, None)


def _forward_conv(
    variant: DoraVariant, layer: LoraLayer, name: str, x: torch.Tensor, result: torch.Tensor
) -> torch.Tensor:
    """nn.Conv1d/2d/3d: x (N, in, *S), result (N, out, *S')."""
    base = layer.get_base_layer()
    magnitude = layer.lora_magnitude_vector[name].weight
    norm = variant.current_norm(layer, name).reshape(magnitude.shape)
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    reuse = _reuses_base(layer, name)
    if not reuse:
        x = layer.lora_dropout[name](x)
    scaling = layer.adapters[name].scaling
    # (N, in, *S) -> (N, r, *S') -> (N, out, *S')
    lora = lora_b(lora_a(x.to(lora_a.weight.dtype))) * scaling
    if reuse:
        bias = None if base.bias is None else base.bias.view(magnitude.shape)
        again = _again(layer, name, x.device.type, lambda x: lora_b(lora_a(x.to(lora_a.weight.dtype))) * scaling)
        return DoraScaleFunction.apply(result, None, lora, magnitude, norm, bias, again, x)
    wx = base._conv_forward(x.to(base.weight.dtype), base.weight, None)
    return DoraScaleFunction.apply(result, wx, lora, magnitude, norm, None)


def _forward_embedding(
    variant: DoraVariant, layer: LoraLayer, name: str, x: torch.Tensor, result: torch.Tensor
) -> torch.Tensor:
    """nn.Embedding: ids x (...), result (..., dim). No dropout on the LoRA path (PEFT's math)."""
    magnitude = layer.lora_magnitude_vector[name].weight
    norm = variant.current_norm(layer, name)
    lora = layer._lora_term(name, x)  # (..., dim), scaled (and by the base's embed_scale, if any)
    again = _again(layer, name, x.device.type, lambda x: layer._lora_term(name, x))
    return DoraScaleFunction.apply(result, None, lora, magnitude, norm, None, again, x)


_FORWARDS: dict[str, Callable[[DoraVariant, LoraLayer, str, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "linear": _forward_linear,
    "conv": _forward_conv,
    "embedding": _forward_embedding,
}
"""Layer kind -> DoRA forward; a new layer kind adds an entry."""


register_variant("dora", lambda c: bool(c.use_dora), DoraVariant)
