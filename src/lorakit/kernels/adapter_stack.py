"""Adapter weights prepared for the fast paths, cached per layer and rebuilt when anything they came from changes.

Two caches, both keyed by what they were built from (parameter identity, in-place version and storage, scaling,
dtype, device), so loading, deleting, re-initialising, training or rescaling an adapter invalidates them:

* ``cast_factors``: one adapter's (A, B) cast to the activation dtype, for inference with float32 masters;
* ``adapter_stack``: every plain adapter of a layer padded to one rank and stacked, with B pre-scaled, for
  mixed-adapter batches (punica-style SGMV/BGMV, arXiv:2310.18547): A (S + 1, R, in), B (S + 1, out, R); the
  last slot is all zeros and serves rows that use no adapter on this layer.

``row_slots`` maps a batch routing to each row's slot, once per routing and layer set (one small host-to-device
copy per model call, not per layer), kept in the routing's per-call scratch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..layers.base import LoraLayer
    from ..routing import BatchRouting


def _param_key(param: torch.Tensor) -> tuple[int, int, int]:
    """Changes when the parameter is replaced, edited in place (optimizer steps, load_state_dict) or re-pointed."""
    return id(param), param._version, param.data_ptr()


def _factor_params(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    # straight to the parameter dicts: nn.Module.__getattr__ costs microseconds, and this runs per adapter per layer
    modules = layer.__dict__["_modules"]
    return (
        modules["lora_A"]._modules[name]._parameters["weight"],
        modules["lora_B"]._modules[name]._parameters["weight"],
    )


def cast_factors(layer: LoraLayer, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapter ``name``'s (A (r, in), B (out, r)) in ``dtype``, detached; cached until the parameters change."""
    a_param, b_param = _factor_params(layer, name)
    if a_param.dtype == dtype and b_param.dtype == dtype:
        return a_param.detach(), b_param.detach()
    cache = layer.__dict__.setdefault("_lorakit_cast_cache", {})
    key = (dtype, _param_key(a_param), _param_key(b_param))
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    a, b = a_param.detach().to(dtype), b_param.detach().to(dtype)
    cache[name] = (key, a, b)
    return a, b


@dataclass
class AdapterStack:
    """A layer's plain adapters stacked for gathered kernels. Slot ``len(names)`` is the zero (base) slot.

    a: (S + 1, R, in); b: (S + 1, out, R), each adapter's B multiplied by its scaling; R >= every rank (zero padded).
    ``records`` and ``sources`` are what it was built from (see ``_stack_valid``).
    """

    names: tuple[str, ...]
    a: torch.Tensor
    b: torch.Tensor
    records: tuple = field(repr=False)
    sources: tuple = field(repr=False)
    slot_of: dict[str, int] = field(default_factory=dict)

    @property
    def zero_slot(self) -> int:
        return len(self.names)


def stackable(layer: LoraLayer, name: str) -> bool:
    """Plain LoRA adapters only: variants (DoRA, ...) and lora_bias adapters take the reference path."""
    record = layer.adapters.get(name)
    return record is not None and record.variant is None and not record.lora_bias


def _scaling_key(record: Any) -> Any:
    """The record's scaling as a float, or (tensor, version) for a pinned scaling tensor: it is updated in place
    with ``fill_``, and reading its value would synchronise the device once per adapter per layer."""
    pinned = record.scaling_tensor
    return record.scaling if pinned is None else (pinned, pinned._version)


def _sources(layer: LoraLayer, names: tuple[str, ...]) -> tuple:
    """Per stacked adapter: its record, factor modules and their parameter dicts, the parameters with their in-place
    versions and storages, and the scaling key."""
    modules = layer.__dict__["_modules"]
    entries = []
    for name in names:
        a_module, b_module = modules["lora_A"]._modules[name], modules["lora_B"]._modules[name]
        a_params, b_params = a_module.__dict__["_parameters"], b_module.__dict__["_parameters"]
        a_param, b_param = a_params["weight"], b_params["weight"]
        record = layer.adapters[name]
        entries.append((name, record, a_module, b_module, a_params, b_params, a_param, b_param, a_param._version,
                        b_param._version, a_param.data_ptr(), b_param.data_ptr(), _scaling_key(record)))  # fmt: skip
    return tuple(entries)


def _stack_valid(layer: LoraLayer, stack: AdapterStack, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``stack`` still matches the layer: same records (adding, deleting or replacing an adapter makes new
    ones), same factor modules and parameters, unchanged in place (version) and not re-pointed (storage), same
    scaling.

    Allocates nothing and touches few objects per adapter: it runs for every layer on every mixed call, over every
    adapter (a key tuple per adapter cost about 100 us per layer in a 32-adapter model, mostly in the garbage
    collections and cache misses it caused).
    """
    if stack.a.dtype != dtype or stack.a.device != device:
        return False
    records = layer.adapters
    if len(records) != len(stack.records):
        return False
    for record, current in zip(stack.records, records.values(), strict=True):
        if record is not current:
            return False
    modules = layer.__dict__["_modules"]
    modules_a, modules_b = modules["lora_A"]._modules, modules["lora_B"]._modules
    for entry in stack.sources:
        name, record, a_module, b_module, a_params, b_params, a_param, b_param, a_ver, b_ver, a_ptr, b_ptr, key = entry
        if (
            modules_a[name] is not a_module
            or modules_b[name] is not b_module
            or a_params["weight"] is not a_param
            or b_params["weight"] is not b_param
            or a_param._version != a_ver
            or b_param._version != b_ver
            or a_param.data_ptr() != a_ptr
            or b_param.data_ptr() != b_ptr
            or _scaling_key(record) != key
        ):
            return False
    return True


def padded_rank(max_rank: int, device: torch.device) -> int:
    """The stack's rank: on CUDA a power of two >= 16 (Triton's tl.dot tiles), elsewhere the largest rank."""
    if device.type != "cuda":
        return max_rank
    return max(16, 1 << (max_rank - 1).bit_length())


def adapter_stack(layer: LoraLayer, dtype: torch.dtype, device: torch.device) -> AdapterStack:
    """The layer's stacked adapters in ``dtype`` on ``device``; rebuilt only when what it was built from changes."""
    stack = layer.__dict__.get("_lorakit_stack")
    if stack is not None and _stack_valid(layer, stack, dtype, device):
        return stack
    names = tuple(n for n in layer.adapters if stackable(layer, n))
    with torch.no_grad():
        # factor rows, not record.r: prepare_model_for_compiled_hotswap zero-pads factors beyond the adapter's rank
        rank = padded_rank(max((_factor_params(layer, n)[0].shape[0] for n in names), default=1), device)
        a = torch.zeros(len(names) + 1, rank, layer.in_features, dtype=dtype, device=device)
        b = torch.zeros(len(names) + 1, layer.out_features, rank, dtype=dtype, device=device)
        for slot, name in enumerate(names):
            a_param, b_param = _factor_params(layer, name)
            r = a_param.shape[0]
            a[slot, :r] = a_param.detach().to(device=device, dtype=dtype)
            b[slot, :, :r] = (b_param.detach().float() * layer.adapters[name].scaling).to(device=device, dtype=dtype)
    records = tuple(layer.adapters.values())
    stack = AdapterStack(names, a, b, records, _sources(layer, names), {n: i for i, n in enumerate(names)})
    layer.__dict__["_lorakit_stack"] = stack
    return stack


def row_slots(routing: BatchRouting, stack: AdapterStack, device: torch.device) -> torch.Tensor:
    """(rows,) long: each row's slot in ``stack`` (the zero slot for base rows and adapters not on this layer).

    Cached in ``routing.scratch`` per stack layout, so a model call copies it to the device once, not once per layer,
    and the cache ends with the call.
    """
    key = ("row_slots", stack.names, device)
    slots = routing.scratch.get(key)
    if slots is None:
        zero = stack.zero_slot
        slots = torch.tensor([stack.slot_of.get(n, zero) for n in routing.adapter_names], device=device)
        routing.scratch[key] = slots
    return slots


def clear_caches(model: torch.nn.Module) -> None:
    """Drop every cached cast / stack / DoRA ||W||^2 in ``model`` (they rebuild on demand); frees their memory."""
    for module in model.modules():
        for attr in ("_lorakit_cast_cache", "_lorakit_stack", "_lorakit_dora_wsq"):
            module.__dict__.pop(attr, None)
