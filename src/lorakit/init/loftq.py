"""LoftQ (arXiv:2310.08659): quantise the base weight and start the adapter at the best rank-r fit of what
quantisation lost, so that Q(W) + B @ A is close to W before fine-tuning.

With W (out, in) in float32: res = W; for each of ``loftq_iter`` iterations: Q = dequant(quant(res)), then the SVD
of W - Q = U S Vh gives B = U_r sqrt(S_r) (out, r) and A = sqrt(S_r) Vh_r (r, in); before another iteration
res = W - B @ A. The base weight becomes the last Q (stored in the layer's dtype: load the saved model with the same
quantiser to get it back exactly) and A, B are used as they are, without dividing by the scaling (as PEFT: choose
lora_alpha = r for B @ A to close the gap exactly).

The quantisers are bitsandbytes': 4 bits is NF4 (block size 64, no nested statistics), 8 bits is row-wise absmax
int8 from float16, each as PEFT's LoftQ. ``LOFTQ_QUANTISERS`` maps bits to a round trip and can be extended.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..config import LoftQConfig
from .registry import InitRequest, InitResult, register_init
from .residual import FLOAT_DTYPES, base_dtype, matrix_weight, require_rank_fits, split_singular_values

if TYPE_CHECKING:
    from ..config import LoraConfig

NF4_BLOCKSIZE = 64


def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """dequant(quant(W)) with bitsandbytes' NF4; W in its stored layout, result float32 of the same shape."""
    from ..layers.bnb import import_bitsandbytes  # lazily: lorakit.layers imports lorakit.init

    bnb = import_bitsandbytes("LoftQ with loftq_bits=4")
    # Blocks are consecutive runs of 64 values of the flattened weight. bitsandbytes' CPU dequantisation cuts
    # blocks per row instead, which disagrees when a row is not a whole number of blocks; rows of exactly one block
    # make both agree (and are what the GPU kernels compute for any shape).
    values = weight.float().contiguous()
    rows = values.reshape(-1, NF4_BLOCKSIZE) if values.numel() % NF4_BLOCKSIZE == 0 else values.reshape(-1)
    codes, state = bnb.functional.quantize_4bit(
        rows, blocksize=NF4_BLOCKSIZE, compress_statistics=False, quant_type="nf4"
    )
    return bnb.functional.dequantize_4bit(codes, state).float().reshape(weight.shape)


def int8_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """dequant(quant(W)) with bitsandbytes' row-wise absmax int8 (from float16, as ``Int8Params``); (out, in)."""
    from ..layers.bnb import import_bitsandbytes

    bnb = import_bitsandbytes("LoftQ with loftq_bits=8")
    codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16).contiguous())
    return bnb.functional.int8_vectorwise_dequant(codes, scales).float()


LOFTQ_QUANTISERS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {4: nf4_round_trip, 8: int8_round_trip}
"""loftq_bits -> quantise-then-dequantise of a weight in its stored layout."""


def loftq_settings(config: LoraConfig) -> LoftQConfig:
    """The config's ``loftq_config`` as a validated LoftQConfig (it may be a dict, e.g. read from JSON)."""
    settings = config.loftq_config
    return settings if isinstance(settings, LoftQConfig) else LoftQConfig(**settings)


def quantiser(bits: int) -> Callable[[torch.Tensor], torch.Tensor]:
    if bits not in LOFTQ_QUANTISERS:
        raise ValueError(
            f"LoftQ with loftq_bits={bits} has no quantiser: bitsandbytes provides "
            f"{', '.join(str(b) for b in sorted(LOFTQ_QUANTISERS))} bits (NF4, int8; the bits PEFT supports). "
            "Use one of these, or add a round trip to lorakit.init.loftq.LOFTQ_QUANTISERS."
        )
    return LOFTQ_QUANTISERS[bits]


def low_rank_fit(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-r approximation B @ A of ``residual`` with the singular values split evenly.

    Args:
        residual: (out, in) float32
    Returns:
        A (r, in) = sqrt(S_r) Vh_r, B (out, r) = U_r sqrt(S_r)
    """
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)  # (out, k), (k,), (k, in)
    return split_singular_values(u[:, :rank], s[:rank], vh[:rank], 1.0)


def require_unquantised(req: InitRequest) -> None:
    """LoftQ quantises a floating-point weight itself; on a quantised base say what to do instead."""
    dtype = base_dtype(req)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"init_lora_weights='loftq' quantises a float32/float16/bfloat16 base weight itself, but layer "
            f"{req.module_name!r} is already quantised ({dtype}). For a model loaded in 4 bits use "
            "replace_lora_weights_loftq(peft_model); to load a saved LoftQ adapter onto its quantised base, pass "
            "low_cpu_mem_usage=True to from_pretrained / load_adapter (no re-initialisation) or save the adapter "
            "with init_lora_weights=True."
        )


def _stored_layout(req: InitRequest) -> tuple[Callable, Callable]:
    """(out, in) <-> the layer's stored layout, so blocks are cut as the quantiser will cut the saved weight."""
    layer = req.layer
    if layer is None or not hasattr(layer, "_weight_from_2d"):
        return (lambda m: m), (lambda m: m)
    return layer._weight_from_2d, layer._weight_to_2d


@register_init("loftq", layer_kinds={"linear"})
def init_loftq(req: InitRequest) -> InitResult:
    """A, B and the quantised base weight of LoftQ on a floating-point Linear / Conv1D layer."""
    settings = loftq_settings(req.config)
    round_trip = quantiser(settings.loftq_bits)
    require_unquantised(req)
    weight = matrix_weight(req, "loftq")
    require_rank_fits(req, weight, "loftq")
    to_stored, from_stored = _stored_layout(req)
    residual = weight
    for step in range(settings.loftq_iter):
        dequantised = from_stored(round_trip(to_stored(residual)))
        lora_a, lora_b = low_rank_fit(weight - dequantised, req.rank)
        if step + 1 < settings.loftq_iter:
            residual = weight - lora_b @ lora_a
    return InitResult(lora_a.contiguous(), lora_b.contiguous(), base_weight=dequantised)
