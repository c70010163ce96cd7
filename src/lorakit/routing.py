"""Per-row adapter routing for mixed-adapter batches (``model(..., adapter_names=[...])``).

The routing is computed once per model call and read by every LoRA layer and modules_to_save wrapper. It is state of
that call, never of the process: it lives in a ``CallScoped`` slot (a ContextVar), so threads and asyncio tasks each
see only their own routing, and leaving the call (also by an exception) removes it. For torch.compile the slot keeps
a process-wide count of open scopes: while it is 0 (no routed call anywhere), ``current_routing()`` returns None
without touching the ContextVar (which dynamo cannot trace), so the common case traces without a graph break and
dynamo guards on the count. Work a call hands to other threads (``nn.DataParallel`` replicas) does not inherit the
routing; run mixed batches in the thread that calls the model.

Per-call caches of the consumers (plans, row slots) live in ``BatchRouting.scratch``, so they die with the call.

Generation expands a batch of B prompts to B * k rows (k beams, or k return sequences when sampling) with
``repeat_interleave``, so row ``i * k + j`` comes from prompt ``i``. A routing made for ``generate`` therefore accepts
any layer batch of k * B rows and repeats each name k times; encoder-decoder models see B rows in the encoder and
k * B in the decoder, and both are routed correctly. A routing made for ``forward`` accepts exactly B rows.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

BASE_ADAPTER = "__base__"
"""Rows named this use the base model only."""

T = TypeVar("T")


class CallScoped(Generic[T]):
    """A value visible for the duration of a ``with scope(value):`` block, to the thread / asyncio task that opened
    it only.

    Scopes may overlap in any order (not only nested): each thread's open scopes are a stack in a ContextVar, and
    leaving one removes exactly that entry, so a scope left out of order never leaves its value (or an older one)
    behind. ``get()`` returns the innermost open value or None. ``open_scopes`` counts the scopes open in the whole
    process: while it is 0, ``get()`` is a plain attribute read that torch.compile can trace and guard on.
    """

    def __init__(self, name: str) -> None:
        self._stack: contextvars.ContextVar[tuple[tuple[T], ...]] = contextvars.ContextVar(name, default=())
        self._lock = threading.Lock()
        self.open_scopes = 0

    def get(self) -> T | None:
        if not self.open_scopes:
            return None
        stack = self._stack.get()
        return stack[-1][0] if stack else None

    @contextlib.contextmanager
    def scope(self, value: T) -> Iterator[T]:
        entry = (value,)  # a fresh tuple: identifies this scope even when the same value is opened twice
        with self._lock:
            self.open_scopes += 1
        self._stack.set((*self._stack.get(), entry))
        try:
            yield value
        finally:
            self._stack.set(tuple(e for e in self._stack.get() if e is not entry))
            with self._lock:
                self.open_scopes -= 1


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
    scratch: dict[Any, Any] = field(default_factory=dict, repr=False)
    """Per-call caches of the layers that read this routing (kernel plans, row slots); gone with the call."""

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


_ROUTING: CallScoped[BatchRouting] = CallScoped("lorakit_batch_routing")


def current_routing() -> BatchRouting | None:
    """The routing of the batch this thread is computing, or None for an ordinary forward."""
    return _ROUTING.get()


@contextlib.contextmanager
def route_batch(adapter_names: Sequence[str] | None, expandable: bool = False) -> Iterator[BatchRouting | None]:
    """Make every LoRA layer route rows by ``adapter_names`` inside the block, in this thread / task only (None: no
    routing, also when an outer block routes).

    ``expandable=True`` is for generation, where layers see each row repeated per beam / return sequence.
    Leaving the block, also by an exception, removes the routing.
    """
    if adapter_names is None and current_routing() is None:
        yield None  # nothing to shadow: no scope, so compiled graphs of unrouted calls keep their guards
        return
    routing = BatchRouting.from_names(adapter_names, expandable) if adapter_names is not None else None
    with _ROUTING.scope(routing):
        yield routing
