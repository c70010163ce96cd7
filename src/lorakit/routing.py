"""Per-row adapter routing for mixed-adapter batches (``model(..., adapter_names=[...])``).

The routing is computed once per model call and read by every LoRA layer and modules_to_save wrapper. It lives in a
module global rather than a ContextVar so that torch.compile traces the common (no routing) case without a graph
break: dynamo guards on the global being None. The price: one routed call at a time per process; two threads running
mixed batches on models at once would see each other's routing.

Generation expands a batch of B prompts to B * k rows (k beams, or k return sequences when sampling) with
``repeat_interleave``, so row ``i * k + j`` comes from prompt ``i``. A routing made for ``generate`` therefore accepts
any layer batch of k * B rows and repeats each name k times; encoder-decoder models see B rows in the encoder and
k * B in the decoder, and both are routed correctly. A routing made for ``forward`` accepts exactly B rows.
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
    """Row -> adapter assignment of one batch.

    ``adapter_names[i]`` is the adapter of row i; ``groups`` maps each distinct name to its row indices
    ((n,) long, ascending), in order of first appearance. ``expandable`` allows layer batches of k * len(rows) rows
    (generation); see the module docstring.
    """

    adapter_names: list[str]
    groups: dict[str, torch.Tensor] = field(default_factory=dict)
    expandable: bool = False
    _on_device: dict[torch.device, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _expanded: dict[int, BatchRouting] = field(default_factory=dict, repr=False)

    @classmethod
    def from_names(cls, adapter_names: Sequence[str], expandable: bool = False) -> BatchRouting:
        names = list(adapter_names)
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            groups.setdefault(name, []).append(row)
        tensors = {n: torch.tensor(rows, dtype=torch.long) for n, rows in groups.items()}
        return cls(names, tensors, expandable=expandable)

    def __len__(self) -> int:
        return len(self.adapter_names)

    def for_batch(self, rows: int) -> BatchRouting:
        """The routing of a layer input with ``rows`` rows: this one, or (generation) each name repeated k times.

        Raises ValueError when ``rows`` does not fit: it must equal len(adapter_names), or be a multiple of it for an
        expandable routing.
        """
        n = len(self.adapter_names)
        if rows == n:
            return self
        if self.expandable and n and rows % n == 0:
            if rows not in self._expanded:
                k = rows // n
                self._expanded[rows] = BatchRouting.from_names([a for a in self.adapter_names for _ in range(k)])
            return self._expanded[rows]
        expected = f"{n}" + (" or a multiple of it (beams / return sequences)" if self.expandable else "")
        raise ValueError(
            f"adapter_names has {n} entries but a layer received a batch of {rows} rows; expected {expected}. "
            "Give one adapter name per input row."
        )

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
def route_batch(adapter_names: Sequence[str] | None, expandable: bool = False) -> Iterator[BatchRouting | None]:
    """Make every LoRA layer route rows by ``adapter_names`` inside the block (None: no routing).

    ``expandable=True`` is for generation, where layers see each row repeated per beam / return sequence.
    The previous routing is restored on exit, also on exceptions.
    """
    global _ACTIVE
    previous = _ACTIVE
    _ACTIVE = BatchRouting.from_names(adapter_names, expandable) if adapter_names is not None else None
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = previous
