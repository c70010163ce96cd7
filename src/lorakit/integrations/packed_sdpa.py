"""transformers' SDPA attention that runs each sequence of a packed row on its own (variable-length attention).

A padding-free packed row (``DataCollatorWithFlattening``'s layout: sequences end to end, ``position_ids``
restarting at 0 per sequence, no ``attention_mask``) makes transformers build a (1, 1, N, N) block-diagonal causal
mask for SDPA: exact, but attention then costs N^2 for the whole row, more than the padded batch's B x T_max^2
when lengths are spread (attention is most of a small model's step at T ~ 1k). Flash attention's varlen kernels
avoid that on CUDA; this implementation does it with plain SDPA anywhere: when the mask it is given is exactly the
block-diagonal causal mask of the row's sequences (read from ``position_ids`` as transformers reads them: a new
sequence wherever a position is not the previous one + 1), it calls SDPA once per sequence with ``is_causal=True``,
the call each sequence gets alone, so the outputs equal the unpacked ones. Any other call (padding masks, sliding
windows, extra mask terms, a KV cache, a row holding one sequence) runs transformers' ``sdpa_attention_forward``
unchanged with its mask. Registered through transformers' public ``AttentionInterface`` / ``AttentionMaskInterface``
(the mask function is transformers' ``sdpa_mask``).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

PACKED_SDPA = "lorakit_packed_sdpa"


def sequence_starts(position_ids: torch.Tensor) -> list[int]:
    """(T,) positions -> the index where each sequence starts (transformers' rule: position != previous + 1)."""
    new = torch.ones_like(position_ids, dtype=torch.bool)
    new[1:] = position_ids[1:] != position_ids[:-1] + 1
    return new.nonzero().flatten().tolist()


def _is_block_causal(mask: torch.Tensor, starts: list[int]) -> bool:
    """Whether ``mask`` (N, N) (bool: True attends) is the causal mask of the sequences beginning at ``starts``."""
    n = mask.shape[-1]
    segment = torch.zeros(n, dtype=torch.long, device=mask.device)
    segment[starts[1:]] = 1
    segment = segment.cumsum(0)
    expected = (segment[:, None] == segment[None, :]).tril_()
    return mask.dtype == torch.bool and torch.equal(mask, expected)


def _packed_starts(query: torch.Tensor, key: torch.Tensor, mask: Any, kwargs: dict[str, Any]) -> list[int] | None:
    """The sequence starts of a packed single row whose mask is their block-causal mask, or None."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None or mask is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None
    if position_ids.shape[-1] != query.shape[2] or mask.shape[-2:] != (query.shape[2], key.shape[2]):
        return None
    starts = sequence_starts(position_ids.reshape(-1))
    if len(starts) < 2 or mask.shape[0] != 1 or mask.shape[1] != 1 or not _is_block_causal(mask[0, 0], starts):
        return None
    return starts


def packed_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query (1, H, N, D), key/value (1, H_kv, N, D) -> ((1, N, H, D), None): per sequence when packed (see the
    module docstring), else transformers' SDPA forward."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = _packed_starts(query, key, attention_mask, kwargs)
    if starts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("is_causal", "position_ids")}
    lengths = [e - s for s, e in itertools.pairwise([*starts, query.shape[2]])]
    # split, not one slice per sequence: a slice's backward writes a zero-filled (1, H, N, D) gradient each
    pieces = [
        sdpa_attention_forward(module, q, k, v, None, is_causal=True, **kwargs)[0]
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    return torch.cat(pieces, dim=1), None  # (1, N, H, D)


def register_packed_sdpa() -> str:
    """Register the implementation with transformers (again: harmless) and return its name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention_forward)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA


def use_packed_sdpa(model: Any) -> str | None:
    """Switch a transformers model (or a lorakit model around one) from ``"sdpa"`` to ``PACKED_SDPA``; returns the
    previous implementation's name (``set_attn_implementation(name)`` switches back), or None when the model uses
    another implementation (eager, flash attention: left alone)."""
    base = model
    while not hasattr(base, "set_attn_implementation") and hasattr(base, "get_base_model"):
        base = base.get_base_model()
    current = getattr(getattr(base, "config", None), "_attn_implementation", None)
    if current != "sdpa" or not hasattr(base, "set_attn_implementation"):
        return None
    base.set_attn_implementation(register_packed_sdpa())
    return current
