"""Training progress: a bar with the losses, tokens/s and ETA (rich if installed, else tqdm), or plain log lines.

Two losses are shown, labelled: ``loss`` is the last optimiser step's training loss (noisy: one batch), and
``loss(avg)`` its exponential moving average (weight 0.1 on each new step, so roughly the last ten steps).

``make_progress`` picks the display from a table: a terminal gets a live bar, a pipe or file gets a line every
tenth of the run, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Protocol, TextIO


class Progress(Protocol):
    def __enter__(self) -> Progress: ...

    def __exit__(self, *exc: object) -> None: ...

    def update(self, step: int, loss: float, avg_loss: float, tokens_per_s: float) -> None:
        """Called after optimiser step ``step`` (1-based) with its loss, the moving average of the step losses and
        the recent throughput."""


def _eta(done: int, total: int, elapsed: float) -> str:
    if done <= 0:
        return "?"
    seconds = int(elapsed / done * (total - done))
    return f"{seconds // 60}:{seconds % 60:02d}"


class RichProgress:
    def __init__(self, total: int, start: int, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichBar

        self.bar = RichBar(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("loss(avg) {task.fields[avg]:.4f}"),
            TextColumn("{task.fields[tps]:,.0f} tok/s"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            console=Console(file=stream),
        )
        nan = float("nan")
        self.task = self.bar.add_task("train", total=total, completed=start, loss=nan, avg=nan, tps=0.0)

    def __enter__(self) -> RichProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def update(self, step: int, loss: float, avg_loss: float, tokens_per_s: float) -> None:
        self.bar.update(self.task, completed=step, loss=loss, avg=avg_loss, tps=tokens_per_s)


class TqdmProgress:
    def __init__(self, total: int, start: int, stream: TextIO) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", file=stream, dynamic_ncols=True)

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def update(self, step: int, loss: float, avg_loss: float, tokens_per_s: float) -> None:
        postfix = {"loss": f"{loss:.4f}", "loss(avg)": f"{avg_loss:.4f}", "tok_s": f"{tokens_per_s:,.0f}"}
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(step - self.bar.n)


class LineProgress:
    """One line per tenth of the run (for logs and pipes)."""

    def __init__(self, total: int, start: int, stream: TextIO) -> None:
        self.total, self.start, self.stream = total, start, stream
        self.every = max(1, total // 10)
        self.t0 = time.perf_counter()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stream.flush()

    def update(self, step: int, loss: float, avg_loss: float, tokens_per_s: float) -> None:
        if step % self.every and step != self.total:
            return
        eta = _eta(step - self.start, self.total - self.start, time.perf_counter() - self.t0)
        self.stream.write(
            f"  step {step:>{len(str(self.total))}}/{self.total}  loss {loss:.4f}  loss(avg) {avg_loss:.4f}  "
            f"{tokens_per_s:,.0f} tok/s  "
            f"ETA {eta}\n"
        )
        self.stream.flush()


class NoProgress:
    def __init__(self, total: int, start: int, stream: TextIO) -> None:
        pass

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, step: int, loss: float, avg_loss: float, tokens_per_s: float) -> None:
        pass


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


DISPLAYS: dict[str, Callable[[int, int, TextIO], Progress]] = {
    "rich": RichProgress,
    "tqdm": TqdmProgress,
    "lines": LineProgress,
    "none": NoProgress,
}
"""--progress choice -> display; ``auto`` picks rich or tqdm on a terminal, lines otherwise."""


def make_progress(kind: str, total: int, start: int = 0, stream: TextIO | None = None) -> Progress:
    stream = stream or sys.stderr
    if kind == "auto":
        interactive = getattr(stream, "isatty", lambda: False)()
        kind = ("rich" if _has("rich") else "tqdm") if interactive else "lines"
    if kind == "rich" and not _has("rich"):
        kind = "tqdm"
    return DISPLAYS[kind](total, start, stream)
