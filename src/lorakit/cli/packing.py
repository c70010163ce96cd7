"""Padding-free batches for ``lorakit train``: a micro-batch's sequences concatenated into one row, the layout of
transformers' ``DataCollatorWithFlattening``.

    input_ids    (1, N)  the B sequences end to end, N = their total length (no pad token anywhere)
    position_ids (1, N)  0, 1, ..., n_i - 1 for each sequence: the model's positions restart per sequence
    labels       (1, N)  each sequence's labels, IGNORE_INDEX at its first position, so that the prediction made
                         from one sequence's last token (the causal shift) never targets the next one's first

There is no ``attention_mask``: transformers (``masking_utils.find_packed_sequence_indices``) then reads the
sequence boundaries from the position_ids and builds a block-diagonal causal mask (SDPA, eager, flex) or passes the
cumulative lengths to flash attention, so every sequence attends to itself alone. Each sequence's logits, and so
its loss, are the ones it gets alone; the batch loss (mean over trained tokens) is the padded batch's. Whether a
model really keeps the sequences apart is not assumed: ``packing_reason`` checks it with one small forward, and
``lorakit train`` pads for a model that does not (with a warning naming the reason).

SDPA with that N x N mask costs N^2 for the whole row, more than padding when lengths are spread; ``use_packing``
therefore first switches an SDPA model to ``lorakit.integrations.packed_sdpa`` (SDPA once per sequence: the call
each gets alone), then checks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .data import IGNORE_INDEX, Encoded

PROBE_LENGTHS = (7, 5)
"""Lengths of the two sequences ``packing_reason`` runs packed and alone."""


def pack(rows: list[Encoded]) -> dict[str, torch.Tensor]:
    """One padding-free row of ``rows`` (see the module docstring): input_ids, position_ids, labels, each (1, N)."""
    ids = [torch.tensor(r.input_ids, dtype=torch.long) for r in rows]
    labels = []
    for row in rows:
        first_ignored = torch.tensor(row.labels, dtype=torch.long)
        first_ignored[0] = IGNORE_INDEX  # no loss across a boundary
        labels.append(first_ignored)
    positions = [torch.arange(len(r.input_ids), dtype=torch.long) for r in rows]
    return {
        "input_ids": torch.cat(ids)[None],
        "position_ids": torch.cat(positions)[None],
        "labels": torch.cat(labels)[None],
    }


def real_tokens(batch: dict[str, Any]) -> int:
    """Tokens of the batch that are not padding: the attention mask's ones, or every token of a packed row."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2  # relative to the largest logit


def use_packing(model: nn.Module) -> str | None:
    """Prepare ``model`` for packed rows (SDPA per sequence, ``packed_sdpa``) and check it keeps them apart: None,
    or the reason it does not (the model is then left as it was)."""
    from ..integrations.packed_sdpa import use_packed_sdpa

    previous = use_packed_sdpa(model)
    reason = packing_reason(model)
    if reason and previous is not None:
        model.set_attn_implementation(previous)
    return reason


@torch.no_grad()
def packing_reason(model: nn.Module) -> str | None:
    """Why packed rows would not give this model's per-sequence outputs, or None when they do: two short sequences
    run packed and each alone (eval mode), their logits compared (1e-3 of the largest logit in float32, 5e-2 in
    half precision; a sequence that saw its neighbour differs by far more)."""
    was_training = model.training
    model.eval()
    try:
        vocab = model.get_input_embeddings().num_embeddings
        generator = torch.Generator().manual_seed(0)
        seqs = [torch.randint(4, vocab, (n,), generator=generator).tolist() for n in PROBE_LENGTHS]
        packed = pack([Encoded(s, s) for s in seqs])
        device = next(model.parameters()).device
        try:
            together = model(**{k: v.to(device) for k, v in packed.items() if k != "labels"}, use_cache=False)
            alone = [model(input_ids=torch.tensor([s], device=device), use_cache=False).logits[0] for s in seqs]
        except (TypeError, ValueError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return f"its forward does not take position_ids without an attention mask ({first})"
        expected = torch.cat(alone).float()
        diff = (together.logits[0].float() - expected).abs().max().item()
        scale = expected.abs().max().item()
        if diff > _tolerance(together.logits.dtype) * max(scale, 1.0):
            implementation = getattr(model.config, "_attn_implementation", None)
            return (
                f"its attention ({implementation}) lets packed sequences see each other: the logits of two packed "
                f"sequences differ from their logits alone by {diff:.2g}"
            )
        return None
    finally:
        model.train(was_training)
