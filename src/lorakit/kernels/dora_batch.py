"""DoRA's per-layer factors for every fused DoRA Linear of a model call, computed together for same-shape layers.

Each fused DoRA Linear needs k = m / ||W + s B A|| and B' = k B before its GEMMs (``dora_linear.dora_factors``):
about eight small launches per layer, almost all host time on a GPU step with a hundred layers. Within one call of
the LoRA model the parameters cannot change, so when the first fused DoRA layer of a call asks, the factors of every
DoRA layer the previous call used are computed at once: W A^T per layer (each reads its own W), then the rest for
each group of layers with the same shapes, dtypes, device and scaling as stacked tensors (``dora_linear.norm_tail``
on (L, out, r)), about a dozen launches per group instead of eight per layer. A layer finds its entry only if it
asks with the very tensors the entry was computed from; anything else computes its own as before.

Rides on the model-call scope of ``factor_casts`` (so: off outside ``LoraModel.forward``, in distributed runs, for
gradient checkpointing's recomputation) as one of its extensions.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch

from .dora_linear import DoraFactors, accumulation_dtype, cast_at, dora_factors, norm_tail, projection, weight_sq
from .factor_casts import FactorCasts, current

if TYPE_CHECKING:
    from ..layers.base import LoraLayer

MIN_GROUP = 2  # a shape group of one layer is computed on its own (stacking would only add launches)


class DoraBatch:
    """Which (layer, adapter) pairs the last call used, and this call's factors keyed by (id(layer), adapter)."""

    def __init__(self, casts: FactorCasts) -> None:
        self.casts = casts
        self.previous: list[tuple[weakref.ref, str]] = []
        self.asked: dict[tuple[int, str], tuple[weakref.ref, str]] = {}
        self.entries: dict[tuple[int, str], tuple[tuple, DoraFactors]] | None = None

    def begin(self) -> None:
        self.asked, self.entries = {}, None

    def end(self) -> None:
        self.previous, self.asked, self.entries = list(self.asked.values()), {}, None

    def factors(
        self, layer: LoraLayer, name: str, inputs: tuple, scaling: float, dtype: torch.dtype
    ) -> DoraFactors | None:
        """This call's factors for ``layer``'s adapter ``name`` if they were computed from ``inputs`` (weight, wsq,
        lora_a, lora_b, magnitude; compared by identity) and ``scaling``; else None (the caller computes its own)."""
        key = (id(layer), name)
        if key not in self.asked:
            self.asked[key] = (weakref.ref(layer), name)
        if self.entries is None:
            self.entries = self._compute(dtype)
        hit = self.entries.get(key)
        if hit is None:
            return None
        sources, factors = hit
        same = sources[-1] == scaling and all(a is b for a, b in zip(sources[:-1], inputs))
        return factors if same and factors.kb.dtype == dtype else None

    def _compute(self, dtype: torch.dtype) -> dict[tuple[int, str], tuple[tuple, DoraFactors]]:
        """Factors for every (layer, adapter) of the last call that still exists, grouped by shape, dtype, device
        and scaling; groups of one computed alone."""
        groups: dict[tuple, list[tuple[tuple[int, str], tuple]]] = {}
        for ref, name in self.previous:
            layer = ref()
            sources = None if layer is None else _sources(layer, name, dtype)
            if sources is None:
                continue
            weight, _, lora_a, lora_b, magnitude, scaling = sources
            group = (weight.shape, lora_a.shape, weight.device, lora_a.dtype, lora_b.dtype, magnitude.dtype, scaling)
            groups.setdefault(group, []).append(((id(layer), name), sources))
        entries: dict[tuple[int, str], tuple[tuple, DoraFactors]] = {}
        with torch.no_grad():
            for members in groups.values():
                if len(members) < MIN_GROUP:
                    ((key, sources),) = members
                    weight, wsq, lora_a, lora_b, magnitude, scaling = sources
                    factors = dora_factors(weight, wsq, lora_a, lora_b, magnitude, scaling, dtype, with_inverse=True)
                    entries[key] = (sources, factors)
                    continue
                for key, sources, factors in zip(*_group_factors(members, dtype)):
                    entries[key] = (sources, factors)
        return entries


def _sources(layer: LoraLayer, name: str, dtype: torch.dtype) -> tuple | None:
    """(weight, wsq, lora_a, lora_b, magnitude, scaling) of a fused-eligible DoRA adapter, or None."""
    modules = layer.__dict__["_modules"]
    record = layer.adapters.get(name)
    try:
        weight = modules["base_layer"].__dict__["_parameters"]["weight"]
        lora_a = modules["lora_A"]._modules[name].__dict__["_parameters"]["weight"]
        lora_b = modules["lora_B"]._modules[name].__dict__["_parameters"]["weight"]
        magnitude = modules["lora_magnitude_vector"]._modules[name].__dict__["_parameters"]["weight"]
    except (KeyError, AttributeError):
        return None
    if record is None or weight is None or weight.dtype != dtype or magnitude.dim() != 1:
        return None
    wsq = weight_sq(layer, weight, accumulation_dtype(dtype))
    return weight, wsq, lora_a, lora_b, magnitude, record.scaling


def _group_factors(members: list[tuple[tuple[int, str], tuple]], dtype: torch.dtype):
    """(keys, sources, factors) for L same-shape layers, the small ops on (L, ...) stacks. Shapes: W (out, in),
    A (r, in), B (out, r), m (out,) per layer."""
    keys = [key for key, _ in members]
    sources = [src for _, src in members]
    acc = sources[0][1].dtype
    scaling = sources[0][5]
    a32s = [s[2] if s[2].dtype == acc else s[2].to(acc) for s in sources]
    ats = [cast_at(s[2], a32, dtype) for s, a32 in zip(sources, a32s)]  # (in, r) each, from the batched casts
    wa = torch.stack([projection(s[0], at, acc) for s, at in zip(sources, ats)])  # (L, out, r): one read of each W
    a32 = torch.stack(a32s)  # (L, r, in)
    gram = torch.bmm(a32, a32.transpose(1, 2))  # (L, r, r)
    b32 = torch.stack([s[3] for s in sources])  # (L, out, r)
    if b32.dtype != acc:
        b32 = b32.to(acc)
    wsq = torch.stack([s[1] for s in sources])  # (L, out)
    magnitude = torch.stack([s[4] for s in sources])  # (L, out)
    k_col, inv, kb = norm_tail(wa, b32, gram, wsq, magnitude, scaling, dtype, with_inverse=True)
    # views into the stacks, one unbind per stack (an index per layer would be a dispatched op each)
    factors = [DoraFactors(*parts, scaling) for parts in zip(k_col.unbind(0), inv.unbind(0), ats, kb.unbind(0))]
    return keys, sources, factors


def dora_batch(casts: FactorCasts) -> DoraBatch:
    """The DoRA batch riding on ``casts``'s model-call scope (created on first use)."""
    batch = casts.extensions.get("dora")
    if batch is None:
        batch = casts.extensions["dora"] = DoraBatch(casts)
    return batch


def batched_factors(layer: LoraLayer, name: str, inputs: tuple, scaling: float, dtype: torch.dtype) -> Any:
    """This model call's batched factors for ``layer``'s adapter ``name`` (see ``DoraBatch.factors``), or None
    outside a model call."""
    casts = current()
    return None if casts is None else dora_batch(casts).factors(layer, name, inputs, scaling, dtype)
