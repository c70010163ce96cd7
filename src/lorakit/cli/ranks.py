"""The ranks of a ``lorakit train`` launched by torchrun: process group, per-rank device, and the few collectives the
command needs to agree (same options, rank 0's checks and files, the step's loss and stop request).

torchrun (``torch.distributed.run``) sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; without them
the run is one process and every helper here is a no-op. Rank 0 alone checks ``--out``, reads the checkpoint and
writes files; ``on_main`` runs such a step there and hands its result, or its error, to every rank, so all ranks stop
with the same one-line message instead of waiting for a rank that already failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import CliError, one_line

T = TypeVar("T")

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
COLLECTIVE_TIMEOUT_MINUTES = 60
"""How long a rank waits in a collective: the other ranks wait for rank 0's evaluations (held-out loss, generations)
at their next one, longer than nccl's default of 10 minutes allows for a large model."""
NOT_COMPARED = frozenset({"run", "argv", "debug"})
"""Parsed options left out of the comparison across ranks (the function to run, the raw argv, tracebacks)."""


class RankFailure(CliError):
    """Another rank failed or the launcher stopped this one: exit 1 (not a usage error)."""

    exit_code = 1


@dataclass
class World:
    """This process's place in the run; ``World()`` is a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str = ""
    device: str = "cpu"  # where collective tensors live (nccl needs CUDA)

    @property
    def distributed(self) -> bool:
        return bool(self.backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def name(self) -> str:
        return f"rank {self.rank}/{self.size}"

    def on_main(self, fn: Callable[[], T], what: str) -> T:
        """``fn()`` on rank 0, its result broadcast to every rank; a CliError there is raised on every rank."""
        if not self.distributed:
            return fn()
        import torch.distributed as dist

        box: list[Any] = [None]
        failure: Exception | None = None
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except CliError as err:
                failure, box[0] = err, ("usage", one_line(err))
            except Exception as err:  # every rank must hear of it, or they wait for rank 0 until a timeout
                failure, box[0] = err, ("crash", f"{type(err).__name__}: {one_line(err)[:300]}")
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "ok":
            return value
        if failure is not None:
            raise failure
        if status == "usage":
            raise CliError(f"{value} (rank 0, {what})")
        raise RankFailure(f"{self.name()}: rank 0 failed while {what} ({value}).")

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (pickled objects), in rank order; ``[value]`` for one process."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def totals(self, values: list[float]) -> list[list[float]]:
        """Every rank's ``values`` (a few floats, one tensor collective): ``[[rank 0's], [rank 1's], ...]``."""
        if not self.distributed:
            return [list(values)]
        import torch
        import torch.distributed as dist

        mine = torch.tensor(values, dtype=torch.float64, device=self.device)
        out = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(out, mine)
        return [t.tolist() for t in out]

    def check_same(self, what: str, value: dict[str, Any]) -> None:
        """Refuse to go on when ``value`` differs between ranks; the error names the keys and ranks that differ."""
        if not self.distributed:
            return
        digest = hashlib.sha256(repr(sorted(value.items())).encode()).hexdigest()
        gathered = self.gather((digest, value))
        first_digest, first = gathered[0]
        odd = [r for r, (d, _) in enumerate(gathered) if d != first_digest]
        if not odd:
            return
        other = gathered[odd[0]][1]
        keys = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        shown = ", ".join(f"{k} {first.get(k)} vs {other.get(k)}" for k in keys[:6])
        raise CliError(
            f"the ranks were started with different {what}: rank {odd[0]} differs from rank 0 in {shown}"
            f"{' and more' if len(keys) > 6 else ''} (ranks {odd} differ); launch every rank with the same command."
        )


def launched() -> bool:
    """True inside a process started by torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK)."""
    return all(name in os.environ for name in LAUNCH_VARIABLES)


def compared_options(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options by flag (``--lr``), as text, without those in ``NOT_COMPARED``."""
    return {"--" + k.replace("_", "-"): repr(v) for k, v in sorted(vars(args).items()) if k not in NOT_COMPARED}


def _rank_device(args: argparse.Namespace, local_rank: int) -> str:
    """cuda:LOCAL_RANK for --device auto/cuda on a CUDA machine, cpu for --device cpu; one GPU per rank."""
    import torch

    wanted = args.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cpu":
        return "cpu"
    if wanted != "cuda":
        raise CliError(
            f"--device {args.device!r}: under torchrun every rank takes its own device; pass --device cuda (rank "
            "k uses cuda:LOCAL_RANK), cpu or auto."
        )
    if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
        raise CliError(
            f"--device cuda: local rank {local_rank} has no GPU (this machine sees {torch.cuda.device_count()}); "
            "launch at most one process per GPU (--nproc-per-node)."
        )
    return f"cuda:{local_rank}"


def start(args: argparse.Namespace) -> World:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA) and check every rank got the same
    options; sets ``args.device`` to this rank's device. One process (no launcher): ``World()``."""
    nproc = getattr(args, "nproc", None)
    if not launched():
        if getattr(args, "fsdp", False):
            raise CliError("--fsdp shards the model over several processes: add --nproc N, or launch with torchrun.")
        return World()
    size, rank, local_rank = (int(os.environ[name]) for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    if nproc is not None and nproc != int(os.environ.get("LOCAL_WORLD_SIZE", size)):
        raise CliError(
            f"--nproc {nproc} inside a torchrun launch of {os.environ.get('LOCAL_WORLD_SIZE', size)} processes per "
            "machine: leave --nproc out when torchrun starts the ranks."
        )
    import torch
    import torch.distributed as dist

    options = compared_options(args)
    device = _rank_device(args, local_rank)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=COLLECTIVE_TIMEOUT_MINUTES))
    world = World(rank, size, local_rank, backend, device)
    world.check_same("options", options)
    args.device = device
    return world


def finish(world: World) -> None:
    """Leave the process group; the DDP wrapper (and its reducer's threads) must be gone before it is."""
    if world.distributed:
        import gc

        import torch.distributed as dist

        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def lost_contact(err: BaseException) -> bool:
    """An error of a collective: a peer died or the process group broke (gloo/nccl)."""
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(k in text for k in ("gloo", "nccl", "connection", "peer"))


@contextlib.contextmanager
def failures_as_one_line(world: World) -> Iterator[None]:
    """Under torchrun: SIGTERM outside the training loop (the launcher stops every rank when one fails) and broken
    collectives end this rank with one line naming it, not a traceback or a silent kill."""
    if not world.distributed or threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum: int, frame: object) -> None:
        raise RankFailure(
            f"{world.name()}: stopped by SIGTERM outside training (the run was stopped, or another rank failed)."
        )

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    except Exception as err:
        if isinstance(err, CliError) or not lost_contact(err):
            raise
        raise RankFailure(
            f"{world.name()}: lost contact with the other ranks ({one_line(err)[:160]}); another rank stopped first "
            "(see its message). No adapter was written; the last checkpoint, if one was saved, is intact."
        ) from None
    finally:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:  # left so by ignore_late_stop_signals
            signal.signal(signal.SIGTERM, previous)


def ignore_late_stop_signals(world: World) -> None:
    """After the ranks stopped on a signal: torchrun sends the stop to every rank, and a copy that reaches this rank
    after it stopped (another rank's signal came first) is no new request; ignore it while the rank exits."""
    if world.distributed and threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
