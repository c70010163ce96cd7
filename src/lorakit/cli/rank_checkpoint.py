"""The checkpoint of a run on several ranks: what every rank adds when one is saved (the adapter and optimizer
state gathered from FSDP2 shards, its RNG states) and takes back on ``--resume`` (its own RNG states).

Rank 0 writes (``train_state.save_checkpoint``); the other ranks take part in the gathers. One process is the case
of one rank.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from .ranks import World
from .train_state import TrainState, restore_rng, rng_of_rank, rng_state, save_checkpoint


def save_on_every_rank(
    out: Path, world: World, parallel: Any, peft_model: Any, optimizer: Any, state: TrainState, info: dict[str, Any]
) -> None:
    """Called by every rank at the same step: gather (collectives), then rank 0 writes; its failure ends all."""
    adapter = parallel.adapter_state(peft_model)
    optimizer_state = parallel.optimizer_state(optimizer)
    rngs = world.gather(rng_state())
    world.on_main(
        lambda: save_checkpoint(out, peft_model, optimizer_state, state, info, rng_ranks=rngs, adapter_state=adapter),
        "saving the checkpoint",
    )


def restore_rank_rng(payload: dict[str, Any] | None, world: World, seed: int, dropout: float) -> None:
    """This rank's RNG states from the checkpoint; a fresh run gives ranks > 0 their own dropout stream. A checkpoint
    of another number of ranks gives each rank a fresh stream (the batches still continue exactly)."""
    if payload is None:
        if world.rank > 0:
            torch.manual_seed((seed + world.rank) % 2**63)
        return
    own = rng_of_rank(payload, world.rank, world.size)
    if own is not None:
        restore_rng(own)
        return
    if world.is_main and dropout > 0:
        warnings.warn(
            f"--resume: the checkpoint was written by {len(payload['rng_ranks'])} ranks, this run has {world.size}: "
            "the batches continue exactly, dropout's random masks do not.",
            stacklevel=2,
        )
    torch.manual_seed((seed + world.rank + 1000 * payload["state"].step) % 2**63)
