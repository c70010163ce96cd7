"""Which rows of each optimiser step a rank reads, and how much its loss weighs, under torchrun.

A step of ``lorakit train`` is one global batch of ``--batch-size x --grad-accum`` sequences (G micro-batches of B
rows, chosen by ``data.batch_indices`` from (seed, step) alone), whatever the number of ranks N. One process
minimises (1/G) sum_m mean_m, the mean over the micro-batches of each one's mean token loss. Under N ranks:

- G a multiple of N: rank r reads the micro-batches [r G/N, (r+1) G/N) whole;
- otherwise, B a multiple of N: every micro-batch is cut into N row slices and rank r reads slice r of each.

A shard u of micro-batch m with n_u of its n_m trained tokens gets the weight n_u N / (n_m G): DDP (and FSDP's
reduce-scatter) average the ranks' gradients, so the average of sum_u weight_u * grad(mean_u) is exactly one
process's gradient of (1/G) sum_m mean_m, and every rank makes the same number of backward passes. The loss of a
batch is taken to be the mean over its trained tokens (labels shifted by one, ``IGNORE_INDEX`` skipped), as a
transformers causal LM computes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .data import IGNORE_INDEX, Encoded, batch_indices, collate
from .errors import CliError
from .packing import pack as pack_rows


@dataclass
class Shard:
    batch: dict[str, Any]  # input_ids, attention_mask, labels: (b, T); packed: input_ids, position_ids, labels (1, N)
    weight: float  # the batch's mean loss is multiplied by this before backward


def check_split(batch_size: int, grad_accum: int, n_rows: int, world_size: int) -> None:
    """One clear error when a step's sequences cannot be split evenly over the ranks."""
    if world_size == 1 or grad_accum % world_size == 0:
        return
    if batch_size % world_size:
        raise CliError(
            f"--batch-size {batch_size} x --grad-accum {grad_accum} = {batch_size * grad_accum} sequences per step "
            f"cannot be split evenly over {world_size} ranks: make --grad-accum or --batch-size a multiple of "
            f"{world_size}."
        )
    if min(batch_size, n_rows) < world_size:
        raise CliError(f"{n_rows} training sequences cannot feed {world_size} ranks; use fewer processes.")


def describe_split(batch_size: int, grad_accum: int, world_size: int) -> str:
    """What each rank reads per step, for the run's header."""
    if world_size == 1:
        return ""
    total = batch_size * grad_accum
    if grad_accum % world_size == 0:
        each = f"{grad_accum // world_size} micro-batch(es) of {batch_size}"
    else:
        each = f"{grad_accum} micro-batch(es) of {batch_size // world_size}"
    return f"; split over {world_size} ranks: each reads {total // world_size} of every step's {total} ({each})"


def _trained_tokens(row: Encoded) -> int:
    return sum(1 for label in row.labels[1:] if label != IGNORE_INDEX)


def step_shards(
    rows: list[Encoded],
    step: int,
    *,
    batch_size: int,
    grad_accum: int,
    seed: int,
    pad_id: int,
    rank: int = 0,
    world_size: int = 1,
    width: int | None = None,
    pack: bool = False,
) -> list[Shard]:
    """The shards rank ``rank`` of ``world_size`` trains on in optimiser step ``step`` (0-based), in order; each
    shard's rows padded to one width (``data.collate``) or, with ``pack``, in one padding-free row (``packing``)."""
    micro = [batch_indices(len(rows), step * grad_accum + m, batch_size, seed) for m in range(grad_accum)]
    if grad_accum % world_size == 0:
        per_rank = grad_accum // world_size
        pieces = [(chosen, chosen) for chosen in micro[rank * per_rank : (rank + 1) * per_rank]]
    else:
        pieces = [(c[len(c) * rank // world_size : len(c) * (rank + 1) // world_size], c) for c in micro]
    shards = []
    for mine, whole in pieces:
        n_mine = sum(_trained_tokens(rows[i]) for i in mine)
        n_whole = sum(_trained_tokens(rows[i]) for i in whole)
        weight = n_mine * world_size / (max(n_whole, 1) * grad_accum)
        chosen = [rows[i] for i in mine]
        shards.append(Shard(pack_rows(chosen) if pack else collate(chosen, pad_id, width), weight))
    return shards
