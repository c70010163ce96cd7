"""``layers_to_transform`` must name layers the model has: ``[0, 99]`` on a 2-layer model is an error that gives the
valid range (PEFT adapts layer 0 and says nothing about 99)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .match import layer_index

if TYPE_CHECKING:
    from ..config import LoraConfig


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0..2, 5'."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in spans)


def check_layers_in_range(config: LoraConfig, module_names: Iterable[str]) -> None:
    """Raise ValueError when ``config.layers_to_transform`` names layer indices that no module of the model has,
    next to ones it has (when none exists nothing is selected, and injection's no-match error lists the indices).

    ``module_names``: paths of the model's modules. Layer indices are read as for matching (``layers_pattern``, or
    the first numbered path segment). Nothing to check without layers_to_transform or with a regex target_modules.
    """
    wanted = config.layers_to_transform
    if wanted is None or isinstance(config.target_modules, str):
        return
    wanted = [wanted] if isinstance(wanted, int) else list(wanted)
    if not wanted:
        return
    present = sorted({i for i in (layer_index(n, config.layers_pattern) for n in module_names) if i is not None})
    missing = sorted(set(wanted) - set(present))
    if not missing or len(missing) == len(set(wanted)):
        return  # every index missing: nothing is selected, and explain_no_match lists the indices found
    where = f"layers_pattern={config.layers_pattern!r}" if config.layers_pattern else "the first numbered path part"
    raise ValueError(
        f"layers_to_transform={config.layers_to_transform!r} asks for layer(s) {missing} that do not exist: the "
        f"model has layers {_ranges(present)} (indices read from {where})."
    )
