"""bitsandbytes' base products as the quantised fused node needs them (``kernels/quantised_linear.QuantisedBase``).

The forward product is the bitsandbytes layer's own forward (its kernel, compute-dtype casts and bias), called by
the node with autograd off, so the base output is the reference path's to the bit. The input gradient is what
bitsandbytes' own backward computes, the weight dequantised per call:

* 4-bit (``MatMul4Bit.backward``): dX = (dY in the compute dtype) @ dequantize_4bit(W) cast to it, then cast to
  x's dtype (the backward of ``Linear4bit``'s input cast);
* 8-bit (``MatMul8bitLt`` / ``MatMul8bitFp`` backward): dX = dY @ (CB * SCB / 127), in x's dtype.

``base_4bit`` / ``base_8bit`` return None where the node cannot stand in for the module: hooks or a patched forward,
a trainable bias, an 8-bit weight not quantised yet, and for 4-bit on CPU a weight that bitsandbytes has repacked (or
would repack: eval mode) for inference while x needs a gradient (bitsandbytes then multiplies in bfloat16 and gives x
none, which the reference path reproduces). The quantised weight itself gets no gradient from bitsandbytes' backward
either way, so whether it requires one does not matter; nor is its device checked (bitsandbytes refuses a mismatch on
both paths). These checks run per layer per call: they read ``_parameters`` directly, since attribute access on
bitsandbytes' parameter classes goes through ``__torch_function__`` (microseconds each).

Shapes: x (N, in), dY (N, out), dX (N, in), W (out, in).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _plain_module(module: nn.Module, cls: type | None) -> bool:
    """``module`` runs ``cls.forward`` as is: no subclass forward, no hooks, no instance-level forward."""
    state = module.__dict__
    return (
        cls is not None
        and isinstance(module, cls)
        and type(module).forward is cls.forward
        and not state["_forward_hooks"]
        and not state["_forward_pre_hooks"]
        and "forward" not in state
    )


def _frozen_bias(module: nn.Module) -> bool:
    bias = module.__dict__["_parameters"].get("bias")
    return bias is None or not bias.requires_grad


class Bnb4bitBase:
    """A ``bitsandbytes.nn.Linear4bit`` (NF4/FP4) as the node's base."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.forward(x)  # (N, in) -> (N, out) in x's dtype

    def add_input_grad(self, dy: torch.Tensor, dx: torch.Tensor) -> None:
        from bitsandbytes.functional import dequantize_4bit

        weight = self.module.__dict__["_parameters"]["weight"]
        compute = self.module.compute_dtype or dx.dtype
        w = dequantize_4bit(weight.data, weight.quant_state)  # (out, in)
        if w.dtype != compute:
            w = w.to(compute)
        if dy.dtype != compute:
            dy = dy.to(compute)
        if compute == dx.dtype:
            dx.addmm_(dy, w)  # + (N, out) @ (out, in)
        else:
            dx.add_(dy @ w)  # computed in the compute dtype, added in x's, as autograd would


class Bnb8bitBase:
    """A ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8(), arXiv:2208.07339) with int8 weights as the node's base."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.forward(x)  # (N, in) -> (N, out) in x's dtype

    def add_input_grad(self, dy: torch.Tensor, dx: torch.Tensor) -> None:
        state = self.module.state
        w = state.CB.to(dx.dtype, copy=True).mul_(state.SCB.unsqueeze(1).mul(1.0 / 127.0))  # (out, in)
        dx.addmm_(dy if dy.dtype == dx.dtype else dy.to(dx.dtype), w)  # + (N, out) @ (out, in)


def base_4bit(module: nn.Module, cls: type | None, x: torch.Tensor) -> Bnb4bitBase | None:
    """``module`` (a ``cls`` = bitsandbytes' Linear4bit) as the node's base for ``x``, or None (module docstring)."""
    if not _plain_module(module, cls) or not _frozen_bias(module):
        return None
    state = getattr(module.__dict__["_parameters"]["weight"], "quant_state", None)
    if state is None:
        return None
    if x.requires_grad and (getattr(state, "packing_format_for_cpu", False) or not module.training):
        return None
    return Bnb4bitBase(module)


def base_8bit(module: nn.Module, cls: type | None, x: torch.Tensor) -> Bnb8bitBase | None:
    """``module`` (a ``cls`` = bitsandbytes' Linear8bitLt) as the node's base for ``x``, or None."""
    if not _plain_module(module, cls) or not _frozen_bias(module):
        return None
    if module.state.has_fp16_weights or module.__dict__["_parameters"]["weight"].dtype.is_floating_point:
        return None
    return Bnb8bitBase(module)
