"""Which fused LoRA Linears of a model call read the same input, and their outputs computed by one shared node.

Attention's q/k/v projections and an MLP's gate/up projections are called one after the other on the very same
tensor. Within one call of the LoRA model, every fused-eligible Linear (one plain adapter, no dropout; training or
inference) records its input; consecutive layers that got the same tensor (same object, unmodified) form a
group, learned from the previous call of the same model, as the factor casts are (``factor_casts``). In the next call
the group's first layer computes every member's output through ``shared_input_linear.SharedInputLora`` (one node:
one GEMM for x A^T, one for dX's low-rank part, one weight gradient for the A's) and keeps the others' outputs for
them (inference: the same shared GEMM for x A^T, without autograd); a member takes its output only when it is
called with that same, unmodified tensor, and otherwise computes its own as before (the kept output is then simply
never used and gets no gradient). A member that stopped being
eligible (a hook, dropout, another adapter, a merge) breaks the group for that call: every layer computes alone.

Off where the recomputation of gradient checkpointing could see a different graph: while saved-tensor hooks are
active (non-reentrant checkpointing runs the first forward under them; the recomputation runs outside the model
call and takes the per-layer nodes, whose saved tensors must match), and outside ``LoraModel.forward``. ``ENABLED``
turns it off (benchmarks compare both). Inputs made under ``torch.inference_mode`` have no version counter, so an
in-place edit between two members' calls could not be detected: they are never grouped (``no_grad`` inputs are).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .adapter_stack import cast_factors
from .factor_casts import current
from .shared_input_linear import shared_input_inference, shared_input_lora

if TYPE_CHECKING:
    from ..layers.linear import Linear
    from .linear_dispatch import FusedPlan

ENABLED = True
_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def saved_tensor_hooks_active() -> bool:
    """Saved-tensor hooks (non-reentrant checkpointing, offloading) are installed (unknown: assume they are)."""
    return _top_hooks is None or _top_hooks(True) is not None


class SharedInputs:
    """Per-model state: the groups learned from the last call; this call's runs of layers and kept outputs."""

    def __init__(self) -> None:
        self.groups: dict[int, list[weakref.ref]] = {}  # id(first layer) -> the other members, in call order
        self.begin()

    def begin(self) -> None:
        self.run: list[Any] = []
        self.runs: list[list[Any]] = []
        self.last: tuple[torch.Tensor, int] | None = None  # the input of the last recorded layer and its version
        self.kept: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}  # id(member) -> (x, version, output)

    def end(self) -> None:
        self._close_run()
        self.groups = {id(run[0]): [weakref.ref(layer) for layer in run[1:]] for run in self.runs}
        self.begin()  # drops the kept outputs and the last input

    def _close_run(self) -> None:
        if len(self.run) > 1:
            self.runs.append(self.run)
        self.run = []

    def _record(self, layer: Linear, x: torch.Tensor) -> None:
        last = self.last
        if last is not None and last[0] is x and last[1] == x._version and all(m is not layer for m in self.run):
            self.run.append(layer)
            return
        self._close_run()
        self.run, self.last = [layer], (x, x._version)

    def forward(self, layer: Linear, x: torch.Tensor, plan: FusedPlan, plan_of: Callable[[Linear, torch.Tensor], Any]):
        """``layer``'s output from its group (kept, or computed now for the whole group), else None."""
        if x.is_inference():  # no version counter: an in-place edit between two members could not be seen
            return None
        kept = self.kept.pop(id(layer), None)
        self._record(layer, x)
        if kept is not None:
            return kept[2] if kept[0] is x and kept[1] == x._version else None
        members = self.groups.get(id(layer))
        if not members or saved_tensor_hooks_active():
            return None
        plans, layers = [plan], [layer]
        for ref in members:
            member = ref()
            other = None if member is None else plan_of(member, x)
            if other is None or other.record.variant is not None or other.p != 0.0 or other.graph != plan.graph:
                return None  # all plain LoRA without dropout, all through the node or all plain inference ops
            plans.append(other)
            layers.append(member)
        if plan.graph:
            outs = shared_input_lora(x, [(q.weight, q.bias, q.lora_a, q.lora_b, q.record.scaling) for q in plans])
        else:
            casts = [cast_factors(m, q.name, x.dtype) for m, q in zip(layers, plans)]  # cached per layer
            cast_members = [(q.weight, q.bias, a, b, q.record.scaling) for q, (a, b) in zip(plans, casts)]
            outs = shared_input_inference(x, cast_members)
        layers = layers[1:]
        for member, out in zip(layers, outs[1:]):
            self.kept[id(member)] = (x, x._version, out)
        return outs[0]


def shared_forward(layer: Linear, x: torch.Tensor, plan: FusedPlan, plan_of: Callable) -> torch.Tensor | None:
    """``layer``'s output through its shared-input group in this model call, or None (compute it alone)."""
    if not ENABLED:
        return None
    casts = current()
    if casts is None:
        return None
    shared = casts.extensions.get("shared")
    if shared is None:
        shared = casts.extensions["shared"] = SharedInputs()
    return shared.forward(layer, x, plan, plan_of)
