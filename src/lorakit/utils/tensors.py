"""Small tensor helpers PEFT exports at top level: ``shift_tokens_right``, ``cast_mixed_precision_params``."""

from __future__ import annotations

import torch
import torch.nn as nn


def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int | None, decoder_start_token_id: int) -> torch.Tensor:
    """Decoder inputs from labels: ``(B, T)`` ids moved one step right, ``decoder_start_token_id`` first, the
    ignore index -100 replaced by ``pad_token_id``. Returns a new ``(B, T)`` tensor; ``input_ids`` is unchanged."""
    if pad_token_id is None:
        raise ValueError(
            "shift_tokens_right needs a pad_token_id to replace the -100 labels with; got None "
            "(set model.config.pad_token_id)."
        )
    shifted = input_ids.new_zeros(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1]  # (B, T-1) -> positions 1..T-1
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill_(shifted == -100, pad_token_id)


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen parameters to ``dtype`` (``torch.float16`` / ``torch.bfloat16``), trainable ones to float32, in place
    (the Parameter objects stay, so optimizers built before still hold them). For AMP training with a half-precision
    base and full-precision adapters."""
    for param in model.parameters():
        param.data = param.data.to(dtype if not param.requires_grad else torch.float32)
