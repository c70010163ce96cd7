"""PNG plots (matplotlib, imported lazily with the non-interactive Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import CliError


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise CliError("plotting needs matplotlib: pip install 'lorakit[plot]'.") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_loss(
    path: Path, losses: list[tuple[int, float]], evals: list[tuple[int, float]], title: str = "LoRA training"
) -> Path:
    """Training loss per step (raw and smoothed) and the held-out loss at the steps it was measured."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if losses:
        steps, values = zip(*losses)
        ax.plot(steps, values, color="#9ecae1", linewidth=1, label="training loss")
        window = max(1, len(values) // 20)
        smooth = [
            sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))
        ]
        ax.plot(steps, smooth, color="#08519c", linewidth=2, label=f"training loss (mean of {window})")
    if evals:
        e_steps, e_values = zip(*evals)
        ax.plot(e_steps, e_values, "o--", color="#d94801", label="held-out loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_norms(path: Path, names: list[str], norms: list[float], title: str) -> Path:
    """Horizontal bars: the norm of each layer's weight update."""
    plt = _pyplot()
    height = max(3.0, 0.22 * len(names) + 1.2)
    fig, ax = plt.subplots(figsize=(8, height), dpi=110)
    ax.barh(range(len(names)), norms, color="#3182bd")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("||scaling * B @ A||_F")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
