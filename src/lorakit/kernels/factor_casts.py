"""The adapter factors of every fused layer cast to the activation dtype in one multi-tensor copy per model call.

With float32 master weights (``autocast_adapter_dtype``, the default) on a bfloat16 model, each fused LoRA Linear
casts its A and B on every forward: two tiny kernels per layer, whose cost is almost all host time (dispatch and
launch, ~10-20 us each on a busy GPU step), 200+ per step on a 1B model. During one call of the LoRA model the
parameters cannot change, so the casts can all be made at once: the first fused layer that asks for its factors
casts, with one ``torch._foreach_copy_``, every factor that the previous call of the same model asked for; factors
not seen before are cast on their own and join the batch of the next call.

Only calls that enter through ``LoraModel.forward`` (``model_call``) use the batch; anything else (a layer called on
its own, the recomputation of gradient checkpointing during backward) casts per layer as before, and so does every
call in a distributed run (FSDP and ZeRO-3 gather and free parameters block by block inside one call). The cast copies
are fresh tensors every call, so a graph kept from an earlier call never sees them change.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch

MIN_BATCH = 8  # fewer factors than this (a layer or two): casting each on its own costs less than a batch
_LOCAL = threading.local()  # the batch of the model call in progress on this thread (DataParallel replicas: threads)


class FactorCasts:
    """Per-model memory of which factors a call used, and the casts of the call in progress."""

    def __init__(self) -> None:
        self.previous: list[weakref.ref] = []  # factors asked for during the last call, each once
        self.casts: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # id -> (param, cast), this call
        self.asked: dict[int, weakref.ref] = {}  # id -> factor, this call (a layer run many times counts once)
        # other per-call batches riding on the same scope (``dora_batch``): objects with begin() and end()
        self.extensions: dict[str, Any] = {}

    def begin(self) -> None:
        self.casts, self.asked = None, {}
        for extension in self.extensions.values():
            extension.begin()

    def end(self) -> None:
        self.previous, self.casts, self.asked = list(self.asked.values()), None, {}
        for extension in self.extensions.values():
            extension.end()

    def _batch(self, dtype: torch.dtype, device: torch.device) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Cast every factor of the last call that still exists and matches (float32 -> ``dtype`` on ``device``)."""
        if len(self.previous) < MIN_BATCH:
            return {}
        params = []
        for ref in self.previous:
            param = ref()
            if param is None or param.device != device or param.dtype == dtype or not param.is_floating_point():
                continue
            if type(param) is torch.nn.Parameter and param.untyped_storage().size() > 0:  # not freed or a subclass
                params.append(param)
        if not params:
            return {}
        src_dtype = params[0].dtype
        params = [p for p in params if p.dtype == src_dtype]  # one source dtype per multi-tensor copy
        with torch.no_grad():
            casts = [torch.empty(p.shape, dtype=dtype, device=device) for p in params]
            torch._foreach_copy_(casts, params)  # no_grad: nothing recorded, no detached views needed
        return {id(p): (p, c) for p, c in zip(params, casts)}

    def cast(self, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``param`` in ``dtype``, detached: from this call's batch, else cast on its own (and batched next call)."""
        if self.casts is None:
            self.casts = self._batch(dtype, param.device)
        key = id(param)
        if key not in self.asked:
            self.asked[key] = weakref.ref(param)
        hit = self.casts.get(key)
        if hit is not None and hit[0] is param and hit[1].dtype == dtype:
            return hit[1]
        return param.detach().to(dtype)


def _sharded_run() -> bool:
    """A distributed run (FSDP, ZeRO-3, ...) may gather and free parameters block by block within one call: a factor
    of the last call need not hold its values when the first layer runs, so no batch there."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def model_call(owner: object) -> Iterator[None]:
    """Scope of one call of a LoRA model: fused layers inside take their factor casts from ``owner``'s batch."""
    if _sharded_run():
        yield
        return
    batch = owner.__dict__.get("_lorakit_factor_casts")
    if batch is None:
        batch = owner.__dict__["_lorakit_factor_casts"] = FactorCasts()
    outer = getattr(_LOCAL, "batch", None)
    _LOCAL.batch = batch
    batch.begin()
    try:
        yield
    finally:
        batch.end()
        _LOCAL.batch = outer


def current() -> FactorCasts | None:
    """The batch of the model call in progress on this thread, or None outside one."""
    return getattr(_LOCAL, "batch", None)
