"""transformers' SDPA attention whose causal mask stays SDPA's ``is_causal`` flag inside a CUDA-graph capture.

transformers skips building a (B, 1, T, T) causal mask when a batch has no padding and lets SDPA apply causality
itself (``is_causal=True``: its fastest kernels). Some releases (5.17, for one) count CUDA stream capture as
tracing and then always build the mask, so a step captured by ``CudaGraphStep`` runs SDPA's masked kernels:
2.7x the attention time on an H200 (1.1B Llama, B4 x T2048: frozen floor 96.3 ms eager, 112.8 ms as a graph).
5.24 skips the mask during capture as in eager. ``use_causal_sdpa(model)`` switches a transformers model to an
implementation registered through transformers' public ``AttentionInterface`` / ``AttentionMaskInterface``: the
same SDPA forward, and a mask function that returns no mask exactly where transformers' own would skip it in eager
(no padding mask, a causal mask, no sliding window); everywhere else it calls transformers' ``sdpa_mask``. Eager
outputs are identical to ``"sdpa"``.
"""

from __future__ import annotations

from typing import Any

CAUSAL_SDPA = "lorakit_causal_sdpa"


def _mask(**kwargs: Any) -> Any:
    """No mask (SDPA's ``is_causal``) for an unpadded causal mask; transformers' ``sdpa_mask`` for anything else."""
    from transformers.masking_utils import sdpa_mask

    skip = kwargs.get("allow_is_causal_skip", False) and kwargs.get("local_size") is None
    return None if skip and kwargs.get("attention_mask") is None else sdpa_mask(**kwargs)


def register_causal_sdpa() -> str:
    """Register the implementation with transformers (again: harmless) and return its name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    AttentionMaskInterface.register(CAUSAL_SDPA, _mask)
    return CAUSAL_SDPA


def use_causal_sdpa(model: Any) -> str:
    """Switch a transformers model (or a lorakit model around one) from ``"sdpa"`` to ``CAUSAL_SDPA``; returns the
    previous implementation's name (``model.set_attn_implementation(name)`` switches back).

    Raises:
        ValueError: the model is no transformers model, or it uses another attention implementation than SDPA
            (eager, flash attention, ...), which has no such mask problem and is left alone.
    """
    base = model
    while not hasattr(base, "set_attn_implementation") and hasattr(base, "get_base_model"):
        base = base.get_base_model()
    config = getattr(base, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if not hasattr(base, "set_attn_implementation") or current is None:
        raise ValueError(f"{type(model).__name__} is not a transformers model with an attention implementation.")
    if current not in ("sdpa", CAUSAL_SDPA):
        raise ValueError(f"The model's attention implementation is {current!r}; use_causal_sdpa replaces 'sdpa' only.")
    base.set_attn_implementation(register_causal_sdpa())
    return current
