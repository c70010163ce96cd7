"""LoRA on bitsandbytes' quantised linears: ``Linear8bitLt`` (LLM.int8(), arXiv:2208.07339) and ``Linear4bit``
(NF4/FP4 as in QLoRA, arXiv:2305.14314).

The quantised base computes its own output. With one plain adapter (the common QLoRA case) the layer takes the
quantised fused node (``kernels/quantised_linear``): bitsandbytes' product, the low-rank part in x's dtype (no float32
copy of x) added in the GEMM epilogue, q/k/v sharing one x A^T; ``bnb_products`` says when. Otherwise (the reference
path) the adapter term is PEFT's: x cast to the adapter's dtype (float32 by default), s * B A dropout(x), cast back
to the output dtype. Everything that needs the base weight as a matrix (merge
and unmerge, OLoRA, DoRA's norm, LoftQ) goes through ``base_weight_2d`` (dequantise to float32) and
``write_base_weight_2d`` (re-quantise with the layer's own settings).

bitsandbytes is never imported at module level: the registry recognises its classes through ``sys.modules`` (a model
cannot hold a bitsandbytes layer unless bitsandbytes was imported), and the methods import it when they run.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..kernels.quantised_dispatch import quantised_forward
from .base import LoraLayer
from .bnb_products import Bnb4bitBase, Bnb8bitBase, base_4bit, base_8bit
from .linear import Linear

INSTALL_HINT = "pip install bitsandbytes"


def import_bitsandbytes(feature: str) -> Any:
    """The bitsandbytes module; ImportError naming ``feature`` and the install command when it is missing."""
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(f"{feature} needs bitsandbytes, which is not installed: {INSTALL_HINT}") from err
    return bitsandbytes


def bnb_class(name: str) -> type | None:
    """``bitsandbytes.nn.<name>`` when bitsandbytes is already imported, else None (never imports it)."""
    return getattr(sys.modules.get("bitsandbytes.nn"), name, None)


def is_bnb_4bit(module: nn.Module, _config: Any = None) -> bool:
    cls = bnb_class("Linear4bit")
    return cls is not None and isinstance(module, cls)


def is_bnb_8bit(module: nn.Module, _config: Any = None) -> bool:
    cls = bnb_class("Linear8bitLt")
    return cls is not None and isinstance(module, cls)


def _standard_layout_4bit(weight: nn.Parameter) -> None:
    """Undo bitsandbytes' CPU inference packing in place (its first no-grad forward on an AVX512-BF16 CPU repacks
    the weight and keeps absmax in bfloat16); bitsandbytes' own state-dict export restores the layout the same way."""
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)


def dequantise_4bit(weight: nn.Parameter) -> torch.Tensor:
    """A ``Params4bit`` weight as a dense (out, in) tensor in its quantisation dtype."""
    from bitsandbytes.functional import dequantize_4bit

    _standard_layout_4bit(weight)
    return dequantize_4bit(weight.data, weight.quant_state)


def dequantise_8bit(layer: nn.Module) -> torch.Tensor:
    """A ``Linear8bitLt``'s weight as a dense (out, in) float32 tensor: int8 rows times SCB / 127.

    After a forward, bitsandbytes moves the row scales (SCB) from the weight into ``layer.state``."""
    weight = layer.weight
    if weight.dtype.is_floating_point:  # has_fp16_weights=True: not quantised yet
        return weight.detach().float()
    from bitsandbytes.functional import int8_vectorwise_dequant

    scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return int8_vectorwise_dequant(weight.data, scales.to(weight.device))


class _QuantisedLinear(Linear):
    """A LoRA Linear over a bitsandbytes base: PEFT's adapter-dtype term, weight access by (de)quantisation."""

    quantisation: ClassVar[str] = ""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer, fan_in_fan_out=False)  # bitsandbytes stores (out, in)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The quantised fused node (``kernels/quantised_dispatch``: bitsandbytes' product, the low-rank part in x's
        dtype, shared with the layers reading the same x) when it applies, else the reference path."""
        fused = quantised_forward(self, x, args, kwargs)
        return fused if fused is not None else LoraLayer.forward(self, x, *args, **kwargs)

    def _lora_term(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self._reference_term(name, x)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Dequantise, add the delta in float32, re-quantise: outputs move by the rounding of one quantisation."""
        warnings.warn(
            f"Merging LoRA into a {self.quantisation} layer re-quantises its weight; outputs change by rounding.",
            stacklevel=2,
        )
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge(self) -> None:
        """Dequantise, subtract the delta, re-quantise: the weight comes back up to two quantisations' rounding."""
        if self.merged:
            warnings.warn(
                f"Unmerging LoRA from a {self.quantisation} layer re-quantises its weight; outputs change by rounding.",
                stacklevel=2,
            )
        super().unmerge()


class Linear4bit(_QuantisedLinear):
    """LoRA on ``bitsandbytes.nn.Linear4bit``: y = base_4bit(x) + s * B A dropout(x), A: (r, in), B: (out, r)."""

    quantisation = "4-bit"

    def quantised_base(self, x: torch.Tensor) -> Bnb4bitBase | None:
        """The base for the quantised node on ``x``, or None (``bnb_products.base_4bit``)."""
        return base_4bit(self.__dict__["_modules"]["base_layer"], bnb_class("Linear4bit"), x)

    def base_weight_2d(self) -> torch.Tensor:
        """(out, in) float32, dequantised (NF4/FP4 codes times their block's absmax)."""
        return dequantise_4bit(self.get_base_layer().weight).float()

    def write_base_weight_2d(self, matrix: torch.Tensor) -> None:
        """Quantise the (out, in) matrix with the layer's settings (type, block size, nested statistics, storage)
        from the dtype the weight was quantised from, on the weight's device."""
        import bitsandbytes as bnb

        base = self.get_base_layer()
        old = base.weight
        _standard_layout_4bit(old)
        new = bnb.nn.Params4bit(
            matrix.detach().to(device=old.device, dtype=old.quant_state.dtype).contiguous(),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=base,
        )
        base.weight = new.to(old.device)  # quantises on that device


class Linear8bitLt(_QuantisedLinear):
    """LoRA on ``bitsandbytes.nn.Linear8bitLt``: y = base_int8(x) + s * B A dropout(x), A: (r, in), B: (out, r)."""

    quantisation = "8-bit"

    def quantised_base(self, x: torch.Tensor) -> Bnb8bitBase | None:
        """The base for the quantised node on ``x``, or None (``bnb_products.base_8bit``)."""
        return base_8bit(self.__dict__["_modules"]["base_layer"], bnb_class("Linear8bitLt"), x)

    def base_weight_2d(self) -> torch.Tensor:
        return dequantise_8bit(self.get_base_layer())

    def write_base_weight_2d(self, matrix: torch.Tensor) -> None:
        """Row-wise absmax int8 of the (out, in) matrix, from float16 as bitsandbytes' ``Int8Params`` does."""
        base = self.get_base_layer()
        old = base.weight
        if old.dtype.is_floating_point:
            super().write_base_weight_2d(matrix)
            return
        import bitsandbytes as bnb

        codes, scales, _ = bnb.functional.int8_vectorwise_quant(matrix.detach().to(old.device, torch.float16))
        base.weight = bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales)
        base.state.reset_grads()
