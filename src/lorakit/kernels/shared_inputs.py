"""Which fused LoRA Linears of a model call read the same input, and their outputs computed by one shared node.

Attention's q/k/v projections and an MLP's gate/up projections are called one after the other on the very same
tensor. Within one call of the LoRA model, every fused-eligible Linear (one plain adapter, no dropout; training or
inference) records its input; consecutive layers that got the same tensor (same object, unmodified) form a
group, learned from the previous call of the same model, as the factor casts are (``factor_casts``). In the next call
the group's first layer computes every member's output through ``shared_input_linear.SharedInputLora`` (one node:
one GEMM for x A^T, one for dX's low-rank part, one weight gradient for the A's) and keeps the others' outputs for
them (inference: the same shared GEMM for x A^T, without autograd); a member takes its output only when it is
called with that same, unmodified tensor, and otherwise computes its own as before (the kept output is then simply
never used and gets no gradient). The first layer checks every member's eligibility on x (the checks of
``linear_dispatch.fused_plan``) before computing for it, so a member that takes its kept output skips its own; one
that stopped being eligible (a hook, dropout, another adapter, a merge) breaks the group for that call: every layer
computes alone.

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
from .eligibility import saved_tensor_hooks_active
from .factor_casts import current
from .shared_input_linear import shared_input_inference, shared_input_lora

if TYPE_CHECKING:
    from ..layers.linear import Linear
    from .linear_dispatch import FusedPlan

ENABLED = True


class SharedInputs:
    """Per-model state: the groups learned from the last call; this call's runs of layers and kept outputs."""

    def __init__(self) -> None:
        self.groups: dict[int, list[weakref.ref]] = {}  # id(first layer) -> the other members, in call order
        # inference: id(first layer) -> (the members' cached A casts, their concatenation), reused while they last
        self.inference_a: dict[int, tuple[tuple[torch.Tensor, ...], torch.Tensor]] = {}
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

    def take(self, layer: Linear, x: torch.Tensor) -> torch.Tensor | None:
        """The output ``layer``'s group computed for it moments ago, if it was for this very, unmodified x (the
        leader checked then that ``layer`` may take the fused path on x); else None, and a stale entry is dropped."""
        kept = self.kept.pop(id(layer), None)
        if kept is None or kept[0] is not x or kept[1] != x._version:
            return None
        self._record(layer, x)
        return kept[2]

    def forward(
        self,
        layer: Linear,
        x: torch.Tensor,
        plan: FusedPlan,
        plan_of: Callable[[Linear, torch.Tensor], Any],
        run: Callable[[torch.Tensor, list, list], tuple[torch.Tensor, ...]] | None = None,
    ):
        """``layer``'s output computed now with its whole group (the others' outputs kept for them), else None.
        ``run(x, plans, layers)`` computes the group's outputs for plans of another kind (``quantised_dispatch``);
        None: the plain Linears' nodes."""
        if x.is_inference():  # no version counter: an in-place edit between two members could not be seen
            return None
        self._record(layer, x)
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
        if run is not None:
            outs = run(x, plans, layers)
        elif plan.graph:
            outs = shared_input_lora(x, [(q.weight, q.bias, q.lora_a, q.lora_b, q.record.scaling) for q in plans])
        else:
            casts = [cast_factors(m, q.name, x.dtype) for m, q in zip(layers, plans)]  # cached per layer
            cast_members = [(q.weight, q.bias, a, b, q.record.scaling) for q, (a, b) in zip(plans, casts)]
            outs = shared_input_inference(x, cast_members, self._inference_a(id(layer), [a for a, _ in casts]))
        layers = layers[1:]
        for member, out in zip(layers, outs[1:]):
            self.kept[id(member)] = (x, x._version, out)
        return outs[0]

    def _inference_a(self, key: int, casts: list[torch.Tensor]) -> torch.Tensor:
        """The members' A casts concatenated (R, in), made again only when a cast changed (cast_factors)."""
        hit = self.inference_a.get(key)
        if hit is None or len(hit[0]) != len(casts) or any(a is not b for a, b in zip(hit[0], casts)):
            hit = self.inference_a[key] = (tuple(casts), torch.cat(casts))
        return hit[1]


def _shared(create: bool) -> SharedInputs | None:
    """The shared-input state of the model call in progress (created on first use), or None outside one."""
    if not ENABLED:
        return None
    casts = current()
    if casts is None:
        return None
    shared = casts.extensions.get("shared")
    if shared is None and create:
        shared = casts.extensions["shared"] = SharedInputs()
    return shared


def kept_output(layer: Linear, x: torch.Tensor) -> torch.Tensor | None:
    """``layer``'s output, computed by its group's first layer in this model call for this very x, or None."""
    shared = _shared(create=False)
    return None if shared is None or not shared.kept else shared.take(layer, x)


def shared_forward(
    layer: Linear, x: torch.Tensor, plan: FusedPlan, plan_of: Callable, run: Callable | None = None
) -> torch.Tensor | None:
    """``layer``'s output computed with its shared-input group in this model call, or None (compute it alone);
    ``run`` as in ``SharedInputs.forward``."""
    shared = _shared(create=True)
    return None if shared is None else shared.forward(layer, x, plan, plan_of, run)
