"""A dynamo backend for compile tests: it counts the graphs it is handed and runs them eagerly (graph capture is
under test, not code generation)."""

from __future__ import annotations

import torch


class CountingBackend:
    """Counts the graphs dynamo hands over (``graphs``) and runs each eagerly."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return gm.forward
