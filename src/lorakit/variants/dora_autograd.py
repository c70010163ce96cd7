"""DoRA's output as autograd functions with hand-derived backwards that save one activation.

DoRA (arXiv:2402.09353) with k = m / ||W + s B A|| (the norm detached, section 4.3 of the paper):

    y = result + (k - 1) W x' + k s B A x'        result = W x + b, x' = dropout(x)

When x' = x (no dropout, or eval mode) W x is the base output minus its bias, so with z = W x' + s B A x':

    y = t + (k - 1) z,   t = result + s B A x'  (= z + b)

Backward, for an upstream gradient g (all sums over tokens):

    dL/dresult = k g          (reuse; with dropout: g, and dL/d(W x') = (k - 1) g)
    dL/dm      = sum(g * z) / ||W + s B A||
    dL/d(s B A x') = k g      -> the usual low-rank gradients of A, B and x'
    dL/db      = -sum((k - 1) g)   where b entered explicitly (reuse, trainable bias)

Only z is saved (in the output dtype), besides the layer input x, which the low-rank gradient of A needs anyway,
and the (N, r) product A x. The matmuls run in the base output's dtype with float32 accumulation, like
torch.autocast, while A, B and m keep their own (e.g. float32) dtype. The output is formed in float32 and rounded
once: rounding z first and scaling it by k afterwards would lose every |k - 1| below half a bfloat16 ulp (~0.2-0.4%),
i.e. the magnitude's effect early in training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


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


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


class DoraLinearFunction(torch.autograd.Function):
    """DoRA on a linear layer, low-rank path included: one fused function, no float32 copy of x kept.

    forward(x, result, wx, lora_a, lora_b, magnitude, norm, scaling, bias) -> y
        x: (..., in) the adapter's input (after dropout when ``wx`` is given)
        result: (..., out) the base layer's output, bias included
        wx: (..., out) W x' without bias when dropout is active, else None (W x is taken from ``result``)
        lora_a: (r, in); lora_b: (out, r); magnitude: (out,); norm: (out,) float32, detached
        scaling: s; bias: (out,) or None, the base bias (only used when ``wx`` is None)
        y: (..., out) in ``result``'s dtype
    """

    @staticmethod
    def forward(ctx, x, result, wx, lora_a, lora_b, magnitude, norm, scaling, bias):
        out_features = result.shape[-1]
        dtype = result.dtype
        acc = accumulation_dtype(dtype)
        with _autocast_off(result.device):
            res2 = result.reshape(-1, out_features)
            k = magnitude.detach().reshape(-1).to(acc) / norm.to(acc)  # (out,)
            ax = x.reshape(-1, x.shape[-1]).to(dtype) @ lora_a.to(dtype).T  # (N, in) @ (in, r) -> (N, r)
            lora = ax.to(acc) @ (lora_b.to(acc) * scaling).T  # s B A x: (N, r) @ (r, out) -> (N, out)
            if wx is None:
                z = lora.add_(res2)  # W x + b + s B A x
                if bias is not None:
                    z.sub_(bias.detach().to(acc))
                y = torch.empty_like(res2)
                if bias is None:
                    torch.mul(z, k, out=y)  # one rounding, from float32
                else:
                    torch.addcmul(bias.detach().to(acc), z, k, out=y)
            else:
                z = wx.reshape(-1, out_features).to(acc) + lora
                y = torch.addcmul(lora.add_(res2), z, k - 1).to(dtype)  # result + s B A x' + (k - 1) z
            z = z.to(dtype)
        ctx.save_for_backward(x, ax, lora_a, lora_b, z, (k - 1).to(dtype), norm)
        ctx.scaling = scaling
        ctx.reuse = wx is None
        ctx.magnitude_meta = (magnitude.shape, magnitude.dtype)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(result.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x, ax, lora_a, lora_b, z, km1, norm = ctx.saved_tensors
        need = ctx.needs_input_grad
        dtype, scaling = z.dtype, ctx.scaling
        grads: list[torch.Tensor | None] = [None] * 9
        with _autocast_off(z.device):
            g = grad_out.reshape(-1, z.shape[-1]).to(dtype)
            gk = torch.addcmul(g, g, km1)  # k g: the gradient of the low-rank output (and of result, reusing)
            if need[1]:
                grads[1] = (gk if ctx.reuse else g).reshape(grad_out.shape)
            if need[2]:
                grads[2] = (g * km1).reshape(grad_out.shape)
            if need[5]:
                shape, mdtype = ctx.magnitude_meta
                grads[5] = ((g * z).sum(0, dtype=norm.dtype) / norm).reshape(shape).to(mdtype)
            if need[8] and ctx.reuse:
                grads[8] = -(g * km1).sum(0, dtype=norm.dtype).to(ctx.bias_dtype)
            if need[4]:
                # (out, N) @ (N, r) -> (out, r)
                grads[4] = ((gk.T @ ax).to(norm.dtype) * scaling).to(lora_b.dtype)
            if need[0] or need[3]:
                dax = gk @ (lora_b * scaling).to(dtype)  # (N, out) @ (out, r) -> (N, r)
                x2 = x.reshape(-1, x.shape[-1])
                if need[3]:
                    grads[3] = (dax.T @ x2.to(dtype)).to(lora_a.dtype)  # (r, N) @ (N, in) -> (r, in)
                if need[0]:
                    grads[0] = (dax @ lora_a.to(dtype)).to(x.dtype).reshape(x.shape)  # (N, r) @ (r, in)
        return tuple(grads)


class DoraScaleFunction(torch.autograd.Function):
    """DoRA's rescaling around a low-rank term computed by autograd (Conv, Embedding).

    forward(result, wx, lora, magnitude, norm, bias) -> y
        result: base output, e.g. (N, C, *S) for a conv or (..., C) for an embedding
        wx: W x' without bias, shaped like ``result``, when dropout is active; else None
        lora: s B A x', shaped like ``result``
        magnitude: broadcastable against ``result`` along the channel axis, e.g. (1, C, 1, 1) or (C,)
        norm: float32, shaped like ``magnitude``, detached
        bias: the base bias viewed to broadcast like ``magnitude``, or None (only used when ``wx`` is None)
        y: shaped like ``result``, in its dtype
    """

    @staticmethod
    def forward(ctx, result, wx, lora, magnitude, norm, bias):
        dtype, lora_dtype = result.dtype, lora.dtype
        acc = accumulation_dtype(dtype)
        with _autocast_off(result.device):
            k = magnitude.detach().to(acc) / norm.to(acc)
            lora = lora.detach().to(acc)
            if wx is None:
                z = lora + result
                if bias is not None:
                    z = z - bias.detach().to(acc)
                y = z * k if bias is None else torch.addcmul(bias.detach().to(acc), z, k)
            else:
                z = wx.to(acc) + lora
                y = torch.addcmul(lora + result, z, k - 1)
            y, z = y.to(dtype), z.to(dtype)
        ctx.save_for_backward(z, (k - 1).to(dtype), norm)
        ctx.reuse = wx is None
        ctx.magnitude_meta = (magnitude.shape, magnitude.dtype)
        ctx.bias_meta = None if bias is None else (bias.shape, bias.dtype)
        ctx.lora_dtype = lora_dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        z, km1, norm = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads: list[torch.Tensor | None] = [None] * 6
        with _autocast_off(z.device):
            g = grad_out.to(z.dtype)
            gk = torch.addcmul(g, g, km1)
            if need[0]:
                grads[0] = gk if ctx.reuse else g
            if need[1]:
                grads[1] = g * km1
            if need[2]:
                grads[2] = gk.to(ctx.lora_dtype)
            if need[3]:
                shape, mdtype = ctx.magnitude_meta
                grads[3] = ((g * z).to(norm.dtype).sum_to_size(shape) / norm).to(mdtype)
            if need[5] and ctx.reuse:
                shape, bdtype = ctx.bias_meta
                grads[5] = -(g * km1).to(norm.dtype).sum_to_size(shape).to(bdtype)
        return tuple(grads)
