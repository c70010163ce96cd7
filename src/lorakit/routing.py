"""Per-row adapter routing for mixed-adapter batches (``model(..., adapter_names=[...])``).

The routing is computed once per model call and read by every LoRA layer. It lives in a module global rather than
a ContextVar so that torch.compile traces the common (no routing) case without a graph break.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

BASE_ADAPTER = "__base__"
"""Rows named this use the base model only."""


@dataclass
class BatchRouting:
    """Row -> adapter assignment of one batch. ``groups`` maps each adapter name to its row indices (1-D long)."""

    adapter_names: list[str]
    groups: dict[str, torch.Tensor] = field(default_factory=dict)
    _on_device: dict[torch.device, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_names(cls, adapter_names: Sequence[str]) -> BatchRouting:
        names = list(adapter_names)
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            groups.setdefault(name, []).append(row)
        return cls(names, {n: torch.tensor(rows, dtype=torch.long) for n, rows in groups.items()})

    def groups_on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The row groups as index tensors on ``device`` (cached per device)."""
        if device not in self._on_device:
            self._on_device[device] = {n: rows.to(device) for n, rows in self.groups.items()}
        return self._on_device[device]

    def row_index(self, order: Sequence[str], device: torch.device) -> torch.Tensor:
        """(B,) long: position of each row's adapter in ``order``, -1 for rows not in ``order`` (base rows)."""
        lookup = {n: i for i, n in enumerate(order)}
        return torch.tensor([lookup.get(n, -1) for n in self.adapter_names], dtype=torch.long, device=device)


_ACTIVE: BatchRouting | None = None


def current_routing() -> BatchRouting | None:
    """The routing of the batch being computed, or None for an ordinary forward."""
    return _ACTIVE


@contextlib.contextmanager
def route_batch(adapter_names: Sequence[str] | None) -> Iterator[BatchRouting | None]:
    """Make every LoRA layer route rows by ``adapter_names`` inside the block (None: no routing)."""
    global _ACTIVE
    previous = _ACTIVE
    _ACTIVE = BatchRouting.from_names(adapter_names) if adapter_names is not None else None
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = previous
