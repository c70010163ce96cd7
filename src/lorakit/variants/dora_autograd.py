"""DoRA's output as autograd functions with hand-derived backwards that save one activation, or none.

DoRA (arXiv:2402.09353) with k = m / ||W + s B A|| (the norm detached, section 4.3 of the paper):

    y = result + (k - 1) W x' + k s B A x'        result = W x + b, x' = dropout(x)

When x' = x (no dropout, or eval mode) W x is the base output minus its bias, so with z = W x' + s B A x':

    y = k z + b

Backward, for an upstream gradient g (all sums over tokens):

    dL/dresult = k g          (reuse; with dropout: g, and dL/d(W x') = (k - 1) g)
    dL/dm      = sum(g * z) / ||W + s B A||   (= sum(g * y) / m when y = k z)
    dL/d(s B A x') = k g      -> the usual low-rank gradients of A, B and x'
    dL/db      = -sum((k - 1) g)   where b entered explicitly (reuse, trainable bias)

What backward keeps: the layer input x (the low-rank gradient of A needs it anyway), the (N, r) product A x and, for
the magnitude, either z or, when y = k z exactly (reuse, no bias, bfloat16/float32/float64), the output y itself:
the next layer usually saves y anyway (an activation's input, attention's v), so that costs nothing. k is kept
at least 1e-12 away from 0 there so that y / k is z (a magnitude of exactly 0 would otherwise lose its gradient).
Keeping y needs a way to form z again: the caller may edit y in place (``y /= 2``, ``y += z``, as a plain layer's
output), so y is kept aside with its version (``kernels.node_output``), and if it was edited backward forms z from
the base output again (``again``, given by the caller: the base layer called on the saved x once more; without
it, z is saved instead of y). Outputs are never views, so in-place edits of them are allowed.

The matmuls run in the base output's dtype with float32 accumulation, like torch.autocast, while A, B and m keep
their own (e.g. float32) dtype. The output is formed in float32 and rounded once: rounding z first and scaling it by
k afterwards would lose every |k - 1| below half a bfloat16 ulp (~0.2-0.4%), i.e. the magnitude's effect early in
training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..kernels.node_output import as_output, keep_output, kept_output


@contextlib.contextmanager
def _autocast_off(device: torch.device) -> Iterator[None]:
    """Run with autocast disabled on ``device`` (the functions below choose their dtypes themselves)."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except (RuntimeError, TypeError):
        enabled = False
    if not enabled:
        yield
        return
    with torch.autocast(device_type=device.type, enabled=False):
        yield


_K_FLOOR = 1e-12  # |k| floor when the output stands in for z (y / k must stay finite and exact)
_SHARES_RANGE = (torch.bfloat16, torch.float32, torch.float64)  # dtypes where k * z cannot underflow at |k| >= 1e-12


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _output_holds_z(reuse: bool, bias: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """True when y = k z exactly, so backward can keep y (shared with the next layer) instead of z."""
    return reuse and bias is None and dtype in _SHARES_RANGE


def _away_from_zero(k: torch.Tensor) -> torch.Tensor:
    """k with |k| >= _K_FLOOR (sign kept, +floor for 0); changes the output by at most 1e-12 of z."""
    return torch.where(k.abs() < _K_FLOOR, torch.full_like(k, _K_FLOOR).copysign(k), k)


def _reduce_to(t: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Sum ``t`` down to the broadcastable ``shape`` (e.g. (N, C, H, W) -> (1, C, 1, 1)), accumulating in ``dtype``."""
    lead = t.dim() - len(shape)
    dims = [*range(lead), *(lead + i for i, n in enumerate(shape) if n == 1 and t.shape[lead + i] != 1)]
    return (t.sum(dim=dims, dtype=dtype) if dims else t.to(dtype)).reshape(shape)


def _magnitude_grad(
    g: torch.Tensor, saved: torch.Tensor, k: torch.Tensor, norm: torch.Tensor, holds_y: bool
) -> torch.Tensor:
    """dL/dm = sum(g * z) / n, from z or from the output y = k z (then / (k n)); shaped like k and norm."""
    total = _reduce_to(g * saved, k.shape, norm.dtype)
    return total / (k * norm) if holds_y else total / norm


class DoraLinearFunction(torch.autograd.Function):
    """DoRA on a linear layer, low-rank path included: one fused function, no float32 copy of x kept.

    forward(x, result, wx, lora_a, lora_b, magnitude, norm, scaling, bias, again) -> y
        x: (..., in) the adapter's input (after dropout when ``wx`` is given)
        result: (..., out) the base layer's output, bias included
        wx: (..., out) W x' without bias when dropout is active, else None (W x is taken from ``result``)
        lora_a: (r, in); lora_b: (out, r); magnitude: (out,); norm: (out,) float32, detached
        scaling: s; bias: (out,) or None, the base bias (only used when ``wx`` is None)
        again: None, or a callable giving ``result`` again from x (backward calls it if y was edited in place)
        y: (..., out) in ``result``'s dtype, not a view
    """

    @staticmethod
    def forward(ctx, x, result, wx, lora_a, lora_b, magnitude, norm, scaling, bias, again=None):
        out_features, dtype = result.shape[-1], result.dtype
        acc = accumulation_dtype(dtype)
        holds_y = again is not None and _output_holds_z(wx is None, bias, dtype)
        with _autocast_off(result.device):
            res2 = result.reshape(-1, out_features)
            k = magnitude.detach().reshape(-1).to(acc) / norm.to(acc)  # (out,)
            if holds_y:
                k = _away_from_zero(k)
            ax = x.reshape(-1, x.shape[-1]).to(dtype) @ lora_a.to(dtype).T  # (N, in) @ (in, r) -> (N, r)
            lora = ax.to(acc) @ (lora_b.to(acc) * scaling).T  # s B A x': (N, r) @ (r, out) -> (N, out)
            if wx is None:
                z = lora.add_(res2)  # W x + b + s B A x
                y = torch.empty_like(res2)
                if bias is None:
                    torch.mul(z, k, out=y)  # k z, rounded once
                else:
                    z.sub_(bias.detach().to(acc))
                    torch.addcmul(bias.detach().to(acc), z, k, out=y)  # b + k z
            else:
                z = wx.reshape(-1, out_features).to(acc) + lora
                y = torch.addcmul(lora.add_(res2), z, k - 1).to(dtype)  # result + s B A x' + (k - 1) z
        y = as_output(y, result.shape[:-1])  # (..., out), not a view: the caller may edit it in place
        ctx.again = again if holds_y else None  # holds no tensor: x comes from the saved tensors
        ctx.save_for_backward(x, ax, lora_a, lora_b, keep_output(ctx, y) if holds_y else z.to(dtype), k, norm)
        ctx.scaling, ctx.reuse, ctx.holds_y = scaling, wx is None, holds_y
        ctx.magnitude_meta = (magnitude.shape, magnitude.dtype)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def _saved_z_or_y(ctx, saved, x, ax, lora_b) -> tuple[torch.Tensor, bool]:
        """(y, True) as the forward made it, or (z, False) formed again when the caller edited y in place; (N, out)."""
        if not ctx.holds_y:
            return saved, False
        y = kept_output(ctx, saved)
        if y is not None:
            return y.reshape(-1, y.shape[-1]), True
        result = ctx.again(x)  # the base output again (holds_y: no bias, result = W x)
        acc = accumulation_dtype(result.dtype)
        with _autocast_off(result.device):
            lora = ax.to(acc) @ (lora_b.to(acc) * ctx.scaling).T  # (N, r) @ (r, out) -> (N, out), as the forward
            z = lora.add_(result.reshape(-1, result.shape[-1]))
        return z.to(result.dtype), False

    @staticmethod
    def backward(ctx, grad_out):
        x, ax, lora_a, lora_b, saved, k, norm = ctx.saved_tensors
        saved, holds_y = DoraLinearFunction._saved_z_or_y(ctx, saved, x, ax, lora_b)
        need = ctx.needs_input_grad
        dtype, scaling = saved.dtype, ctx.scaling
        grads: list[torch.Tensor | None] = [None] * 10
        with _autocast_off(saved.device):
            g = grad_out.reshape(-1, saved.shape[-1]).to(dtype)
            km1 = (k - 1).to(dtype)
            gk = torch.addcmul(g, g, km1)  # k g: the gradient of the low-rank output (and of result, reusing)
            if need[1]:
                grads[1] = (gk if ctx.reuse else g).reshape(grad_out.shape)
            if need[2]:
                grads[2] = (g * km1).reshape(grad_out.shape)
            if need[5]:
                shape, mdtype = ctx.magnitude_meta
                grads[5] = _magnitude_grad(g, saved, k, norm, holds_y).reshape(shape).to(mdtype)
            if need[8] and ctx.reuse:
                grads[8] = -(g * km1).sum(0, dtype=norm.dtype).to(ctx.bias_dtype)
            if need[4]:
                grads[4] = ((gk.T @ ax).to(norm.dtype) * scaling).to(lora_b.dtype)  # (out, N) @ (N, r) -> (out, r)
            if need[0] or need[3]:
                dax = gk @ (lora_b * scaling).to(dtype)  # (N, out) @ (out, r) -> (N, r)
                if need[3]:
                    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
                    grads[3] = (dax.T @ x2).to(lora_a.dtype)  # (r, N) @ (N, in) -> (r, in)
                if need[0]:
                    grads[0] = (dax @ lora_a.to(dtype)).to(x.dtype).reshape(x.shape)  # (N, r) @ (r, in) -> (N, in)
        return tuple(grads)


class DoraScaleFunction(torch.autograd.Function):
    """DoRA's rescaling around a low-rank term computed by autograd (Conv, Embedding).

    forward(result, wx, lora, magnitude, norm, bias, again, x) -> y
        result: base output, e.g. (N, C, *S) for a conv or (..., C) for an embedding
        wx: W x' without bias, shaped like ``result``, when dropout is active; else None
        lora: s B A x', shaped like ``result``
        magnitude: broadcastable against ``result`` along the channel axis, e.g. (1, C, 1, 1) or (C,)
        norm: float32, shaped like ``magnitude``, detached
        bias: the base bias viewed to broadcast like ``magnitude``, or None (only used when ``wx`` is None)
        again: None, or a callable giving (result, lora) again from x (backward calls it if y was edited in place)
        x: the layer's input (only used with ``again``)
        y: shaped like ``result``, in its dtype, not a view
    """

    @staticmethod
    def forward(ctx, result, wx, lora, magnitude, norm, bias, again=None, x=None):
        dtype, lora_dtype = result.dtype, lora.dtype
        acc = accumulation_dtype(dtype)
        holds_y = again is not None and _output_holds_z(wx is None, bias, dtype)
        with _autocast_off(result.device):
            k = magnitude.detach().to(acc) / norm.to(acc)
            if holds_y:
                k = _away_from_zero(k)
            lora = lora.detach().to(acc)
            if wx is None:
                z = lora + result
                if bias is not None:
                    z = z - bias.detach().to(acc)
                y = z * k if bias is None else torch.addcmul(bias.detach().to(acc), z, k)
            else:
                z = wx.to(acc) + lora
                y = torch.addcmul(lora + result, z, k - 1)
            y = y.to(dtype)
        ctx.again = again if holds_y else None  # holds no tensor: x comes from the saved tensors
        ctx.save_for_backward(keep_output(ctx, y) if holds_y else z.to(dtype), k, norm, x if holds_y else None)
        ctx.reuse, ctx.holds_y = wx is None, holds_y
        ctx.magnitude_meta = (magnitude.shape, magnitude.dtype)
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        ctx.lora_dtype = lora_dtype
        return y

    @staticmethod
    def _saved_z_or_y(ctx, saved, x) -> tuple[torch.Tensor, bool]:
        """(y, True) as the forward made it, or (z, False) formed again when the caller edited y in place."""
        if not ctx.holds_y:
            return saved, False
        y = kept_output(ctx, saved)
        if y is not None:
            return y, True
        result, lora = ctx.again(x)  # holds_y: no bias, z = result + lora
        with _autocast_off(result.device):
            z = lora.to(accumulation_dtype(result.dtype)) + result
        return z.to(result.dtype), False

    @staticmethod
    def backward(ctx, grad_out):
        saved, k, norm, x = ctx.saved_tensors
        saved, holds_y = DoraScaleFunction._saved_z_or_y(ctx, saved, x)
        need = ctx.needs_input_grad
        grads: list[torch.Tensor | None] = [None] * 8
        with _autocast_off(saved.device):
            g = grad_out.to(saved.dtype)
            km1 = (k - 1).to(saved.dtype)
            gk = torch.addcmul(g, g, km1)
            if need[0]:
                grads[0] = gk if ctx.reuse else g
            if need[1]:
                grads[1] = g * km1
            if need[2]:
                grads[2] = gk.to(ctx.lora_dtype)
            if need[3]:
                shape, mdtype = ctx.magnitude_meta
                grads[3] = _magnitude_grad(g, saved, k, norm, holds_y).reshape(shape).to(mdtype)
            if need[5] and ctx.reuse:
                shape, bdtype = ctx.bias_meta
                grads[5] = -_reduce_to(g * km1, shape, norm.dtype).to(bdtype)
        return tuple(grads)
