"""Resumable training checkpoints: ``OUT/checkpoint/`` = the adapter in PEFT's format + ``trainer_state.pt``.

``trainer_state.pt`` holds the step, the loss history, the optimiser state, the RNG states and what the run was
started with (model, LoRA options, data fingerprint, settings), so ``lorakit train ... --resume`` continues the run
exactly where it stopped: the batches come from a permutation that depends only on (seed, epoch), and the RNG
states restore dropout's random stream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..io.checkpoint import read_adapter_weights
from .errors import CliError, one_line

CHECKPOINT_DIR = "checkpoint"
INITIAL_DIR = "initial_adapter"
"""The adapter right after a base-changing init (PiSSA, OLoRA, CorDA), kept until the final save converts it."""
STATE_FILE = "trainer_state.pt"
FORMAT_VERSION = 1


@dataclass
class TrainState:
    """Progress of one run; saved in every checkpoint."""

    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, training loss)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss)
    before: dict[str, Any] = field(default_factory=dict)  # metrics measured before training


def file_fingerprint(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(out: Path) -> Path:
    return out / CHECKPOINT_DIR


def save_checkpoint(
    out: Path,
    model: Any,
    optimizer_state: dict[str, Any],
    state: TrainState,
    run: dict[str, Any],
    *,
    rng_ranks: list[dict[str, Any]] | None = None,
    adapter_state: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint next to the old one, then swap it in, so a crash mid-write keeps the previous one.

    ``rng_ranks``: every rank's RNG states (default: this process's); ``adapter_state``: the adapter's tensors
    gathered whole (FSDP2), passed to ``save_pretrained(state_dict=...)``."""
    final = checkpoint_dir(out)
    tmp = out / f".{CHECKPOINT_DIR}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, **({} if adapter_state is None else {"state_dict": adapter_state}))
    rng_ranks = rng_ranks or [rng_state()]
    payload = {
        "format": FORMAT_VERSION,
        "state": dataclasses.asdict(state),
        "optimizer": optimizer_state,
        "rng": rng_ranks[0],
        "rng_ranks": rng_ranks,  # one per rank, in rank order
        "run": run,
    }
    torch.save(payload, tmp / STATE_FILE)
    old = out / f".{CHECKPOINT_DIR}.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return final


def load_checkpoint(out: Path) -> dict[str, Any]:
    path = checkpoint_dir(out) / STATE_FILE
    if not path.is_file():
        raise CliError(f"--resume: no checkpoint to resume in {checkpoint_dir(out)} (expected {STATE_FILE}).")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CliError(f"--resume: {path} is unreadable ({type(err).__name__}); start over with --overwrite.") from None
    if payload.get("format") != FORMAT_VERSION:
        raise CliError(f"--resume: {path} has format {payload.get('format')!r}; this lorakit reads {FORMAT_VERSION}.")
    payload["state"] = TrainState(**payload["state"])
    payload["state"].losses = [tuple(x) for x in payload["state"].losses]
    payload["state"].evals = [tuple(x) for x in payload["state"].evals]
    payload.setdefault("rng_ranks", [payload["rng"]])
    try:  # read here, so rank 0 can hand it to every rank
        payload["adapter"] = read_adapter_weights(checkpoint_dir(out))
    except (OSError, ValueError) as err:
        reason = one_line(err)[:200]
        raise CliError(f"--resume: the adapter in {checkpoint_dir(out)} is unreadable ({reason}).") from None
    return payload


def rng_of_rank(payload: dict[str, Any], rank: int, world_size: int) -> dict[str, Any] | None:
    """This rank's saved RNG states, or None when the checkpoint was written by another number of ranks."""
    states = payload["rng_ranks"]
    return states[rank] if len(states) == world_size else None


def remove_checkpoint(out: Path) -> None:
    for name in (CHECKPOINT_DIR, f".{CHECKPOINT_DIR}.tmp", f".{CHECKPOINT_DIR}.old", INITIAL_DIR):
        if (out / name).exists():
            shutil.rmtree(out / name)
