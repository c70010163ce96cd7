"""The forward of a patched peft LoRA Linear: lorakit's fused nodes where they apply, peft's forward otherwise.

Decided on every call, from the layer's state at that moment:

* ``layer(x)`` with one active adapter, plain LoRA or DoRA, on an ``nn.Linear`` or transformers ``Conv1D`` base
  (no hooks on base or factors), unmerged, adapters enabled, and no dropout to apply (``lora_dropout=0``, or eval
  mode): ``kernels.linear_dispatch.fused_forward`` (the fused node, or the layer's shared-input group, or DoRA's
  node), exactly as lorakit's own ``Linear`` calls it;
* ``layer(x, adapter_names=[...])`` (peft's mixed batches) without gradients into the adapters, plain LoRA rows:
  ``kernels.mixed_dispatch.fast_mixed_forward`` (every row's adapter gathered, one base GEMM), after peft's own
  argument checks (``_check_forward_args``: the same errors as peft);
* anything else, peft's own forward: several active adapters, a merged or disabled layer, dropout in training
  (peft draws the mask: the random stream stays peft's), other variants (aLoRA, ...), lora_bias, extra arguments,
  autocast changing dtypes, torch.compile tracing, hooks, ``lorakit.kernels.use_reference()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..kernels.eligibility import dropout_probability
from ..kernels.linear_dispatch import fused_forward
from ..kernels.mixed_dispatch import fast_mixed_forward
from .scope import call_routing
from .view import PeftLayerView, layer_view


def patched_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's ``lora.Linear.forward`` contract: x (..., in) -> (..., out) (see the module docstring)."""
    cls = type(self)
    view = layer_view(self, cls._lorakit_peft_api)
    out = None
    if not args:
        if not kwargs:
            out = _single(view, x)
        elif len(kwargs) == 1 and "adapter_names" in kwargs:
            out = _mixed(self, view, x, kwargs["adapter_names"])
    return out if out is not None else cls._lorakit_peft_forward(self, x, *args, **kwargs)


def _single(view: PeftLayerView, x: torch.Tensor) -> torch.Tensor | None:
    """The fused path for the active adapter, or None. Dropout in training stays peft's (its random stream)."""
    active = view._active_adapters
    if len(active) == 1:
        dropout = view._modules["lora_dropout"]._modules.get(active[0])
        if dropout is not None and dropout_probability(dropout):
            return None  # p > 0 in training (None: a custom module, which fused_forward refuses itself)
    return fused_forward(view, x, (), {})


def _mixed(
    layer: Any, view: PeftLayerView, x: torch.Tensor, adapter_names: Sequence[str] | None
) -> torch.Tensor | None:
    """The gathered mixed-batch path, or None (peft's ``_mixed_batch_forward``). Rows named ``__base__`` or an
    adapter this layer lacks get the base output, as in peft."""
    if adapter_names is None or not isinstance(adapter_names, (list, tuple)):
        return None
    layer._check_forward_args(x, adapter_names=adapter_names)  # peft's errors (length, merged, DoRA), as peft
    if view._disable_adapters or x.dim() < 2:
        return None
    return fast_mixed_forward(view, x, call_routing(adapter_names), (), {})
