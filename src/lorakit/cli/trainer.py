"""The supervised fine-tuning loop of ``lorakit train``: AdamW on the trainable (LoRA) parameters, warm-up + cosine
learning rate, gradient clipping, progress display, periodic and Ctrl-C checkpoints."""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .data import Encoded, to_device
from .packing import real_tokens
from .progress import Progress
from .ranks import World
from .shards import step_shards
from .train_state import TrainState


@dataclass
class TrainSettings:
    lr: float = 2e-4
    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 0
    eval_every: int = 0
    cuda_graph: bool = False  # forward + backward replayed as a CUDA graph; batches padded to the longest row
    fused_loss: bool = True  # PeftModel.enable_fused_loss(): the loss in chunks, no full logits (lorakit.loss)
    packing: bool = False  # each micro-batch one padding-free row with position_ids (cli.packing)


def learning_rate(step: int, s: TrainSettings) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to a tenth of ``lr`` at ``max_steps``."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps)
    return s.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)


STOP_SIGNALS: dict[int, str] = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
"""Signals that stop training after the current step with a checkpoint (SIGTERM: `kill`, schedulers, containers)."""


class StopRequest:
    """Set by the first stop signal: the loop finishes its step, saves a checkpoint and returns."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.received = 0  # signals this process got (under torchrun another rank's may set signum first)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return STOP_SIGNALS.get(self.signum, f"signal {self.signum}") if self.signum is not None else "nothing"

    @property
    def exit_code(self) -> int:
        """128 + the signal number, the shell's convention (130 after Ctrl-C, 143 after SIGTERM)."""
        return 128 + (self.signum or 0)


@contextlib.contextmanager
def stop_on_signals(announce: bool = True) -> Iterator[StopRequest]:
    """Turn SIGINT and SIGTERM into a stop request while training (a second one aborts at once); ``announce``: say
    so on stderr (under torchrun rank 0 only)."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: object) -> None:
        if stop.received:
            raise KeyboardInterrupt
        stop.received += 1
        stop.signum = stop.signum or signum
        if announce:
            sys.stderr.write(f"\n{stop.name}: finishing this step and saving a checkpoint (Ctrl-C again aborts)\n")

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


class Throughput:
    """Tokens per second over the last few steps."""

    def __init__(self, window: int = 10) -> None:
        self.samples: deque[tuple[float, int]] = deque(maxlen=window)

    def add(self, seconds: float, tokens: int) -> float:
        self.samples.append((seconds, tokens))
        total_s = sum(s for s, _ in self.samples)
        return sum(t for _, t in self.samples) / total_s if total_s > 0 else 0.0


def _micro_step(model: nn.Module, s: TrainSettings) -> Callable[[dict, float], torch.Tensor]:
    """(batch, weight) -> its loss x weight, after the backward that adds its gradients: eager, or with
    ``cuda_graph`` a ``CudaGraphStep`` captured on the first batch (one process: weight = 1 / grad_accum always;
    gradients accumulate over the micro-batches; the optimizer's zero_grad(set_to_none=True) starts each step from
    zero). ``weight`` comes from ``shards.step_shards``."""

    def eager(batch: dict, weight: float) -> torch.Tensor:
        # a packed row: no KV cache, whose presence makes transformers skip the per-sequence mask it reads from
        # position_ids (the sequences would see each other)
        options = {"use_cache": False} if "position_ids" in batch else {}
        loss = model(**batch, **options).loss
        loss = loss * weight
        loss.backward()
        return loss.detach()

    if not s.cuda_graph:
        return eager
    from ..integrations.cuda_graphs import CudaGraphStep

    graph: list[CudaGraphStep] = []

    def replay(batch: dict, weight: float) -> torch.Tensor:
        if not graph:
            graph.append(
                CudaGraphStep(model, batch, loss_fn=lambda out, _: out.loss / s.grad_accum, accumulate_grad=True)
            )
        return graph[0](batch)

    return replay


def _moving_average(losses: list[tuple[int, float]]) -> float | None:
    """The exponential moving average (0.9 old + 0.1 new) of the step losses so far (a resumed run continues it)."""
    average = None
    for _, loss in losses:
        average = loss if average is None else 0.9 * average + 0.1 * loss
    return average


def _agree(world: World, loss: float, tokens: int, stop: StopRequest) -> tuple[float, int, bool]:
    """The step's loss and tokens over all ranks, and whether to stop after this step. One process: when a stop
    signal came at any time in the step. Several ranks: when one came to any rank before this exchange; a signal
    arriving later counts at the next step, so that every rank stops after the same step."""
    rows = world.totals([loss, float(tokens), float(stop.signum or 0)])
    signum = int(max(r[2] for r in rows))
    if signum and not stop.requested:
        stop.signum = signum  # another rank got it: the same checkpoint, message and exit code everywhere
    return sum(r[0] for r in rows) / world.size, int(sum(r[1] for r in rows)), bool(signum)


def _step(
    rows: list[Encoded], s: TrainSettings, step: int, micro_step: Callable, ctx: dict[str, Any]
) -> tuple[float, int]:
    """One optimiser step's forward + backward passes on this rank's shards: (its weighted loss, its tokens)."""
    world, parallel = ctx["world"], ctx["parallel"]
    shards = step_shards(
        rows, step, batch_size=s.batch_size, grad_accum=s.grad_accum, seed=s.seed, pad_id=ctx["pad_id"],
        rank=world.rank, world_size=world.size, width=ctx["width"], pack=s.packing,
    )  # fmt: skip
    loss_sum, tokens = 0.0, 0
    for i, shard in enumerate(shards):
        batch = to_device(shard.batch, ctx["device"])
        with parallel.accumulating(last=i == len(shards) - 1):
            loss_sum += micro_step(batch, shard.weight).item()
        tokens += real_tokens(batch)
    return loss_sum, tokens


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rows: list[Encoded],
    s: TrainSettings,
    state: TrainState,
    *,
    device: torch.device,
    pad_id: int,
    progress: Progress,
    save: Callable[[], None],
    evaluate: Callable[[], float] | None = None,
    on_step: Callable[[int], None] | None = None,
    stop: StopRequest | None = None,
    world: World | None = None,
    parallel: Any = None,
) -> bool:
    """Run optimiser steps from ``state.step`` to ``s.max_steps``; returns False if ``stop`` was requested (by
    ``stop_on_signals``: Ctrl-C, SIGTERM) after saving a checkpoint, True when all steps ran. ``state`` is updated
    in place. Under torchrun, ``world`` is this rank and ``parallel`` the DDP/FSDP2 wrapping (``cli.parallel``):
    every rank calls this with the same arguments and reads its own shard of each step's batch (``cli.shards``)."""
    from .parallel import OneProcess

    world = world or World()
    parallel = parallel or OneProcess(model, world)
    params = [p for p in model.parameters() if p.requires_grad]
    micro_step = _micro_step(parallel.model, s)
    speed = Throughput()
    average: float | None = _moving_average(state.losses)
    parallel.model.train()
    width = max(len(r.input_ids) for r in rows) if s.cuda_graph else None  # one shape for every batch
    ctx = {"world": world, "parallel": parallel, "pad_id": pad_id, "width": width, "device": device}
    stop = stop or StopRequest()
    with progress:
        while state.step < s.max_steps:
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(state.step, s)
            loss_sum, tokens, agreed_stop = _agree(world, *_step(rows, s, state.step, micro_step, ctx), stop)
            if s.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            elapsed = time.perf_counter() - t0
            state.tokens += tokens
            state.seconds += elapsed
            state.losses.append((state.step, loss_sum))
            average = loss_sum if average is None else 0.9 * average + 0.1 * loss_sum
            progress.update(state.step, loss_sum, average, speed.add(elapsed, tokens))
            if evaluate is not None and s.eval_every and state.step % s.eval_every == 0 and state.step < s.max_steps:
                state.evals.append((state.step, evaluate()))
                parallel.model.train()
            if on_step is not None:
                on_step(state.step)
            if agreed_stop if world.distributed else stop.requested:
                save()
                return False
            if s.save_every and state.step % s.save_every == 0 and state.step < s.max_steps:
                save()
    return True
