"""Fused causal-LM loss: the cross-entropy of the output projection in chunks of tokens, never the full logits.

| file | concept |
| --- | --- |
| ``chunked.py`` | exact chunked linear cross-entropy (an autograd node that makes its gradients chunk by chunk) |
| ``liger.py`` | Liger Kernel's fused linear cross-entropy for plain Linear heads on CUDA (optional extra) |
| ``heads.py`` | per-family logits maps (softcap, scale) and MoE auxiliary loss: a registry by model class |
| ``labels.py`` | shifted targets and the loss denominator, as transformers' ``ForCausalLMLoss`` |
| ``forward.py`` | a causal LM's training forward: backbone, then the fused loss; fallbacks with their reasons |
| ``settings.py`` | the per-model switch (chunk size, Liger on/off, reasons warned about) |

Users turn it on with ``PeftModel.enable_fused_loss()``.
"""

from .chunked import ChunkedHead, chunked_linear_cross_entropy
from .forward import fused_causal_lm_forward
from .heads import HEADS, HeadRecipe, LogitsMap, register_head
from .settings import FusedLossSettings

__all__ = [
    "HEADS",
    "ChunkedHead",
    "FusedLossSettings",
    "HeadRecipe",
    "LogitsMap",
    "chunked_linear_cross_entropy",
    "fused_causal_lm_forward",
    "register_head",
]
