"""The fused DoRA Linear node (kernels/dora_linear.py) against the reference DoRA path and a float64 formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lorakit
from lorakit.kernels import use_reference
from lorakit.kernels.dora_linear import fused_dora_linear

FUSED = "FusedDoraLinearBackward"


class Net(nn.Module):
    def __init__(self, bias: bool = True, d_in: int = 24, d_out: int = 20) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x):
        return self.lin(x)


def _model(bias=True, dtype=torch.float32, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    cfg = lorakit.LoraConfig(target_modules=["lin"], r=4, lora_alpha=8, use_dora=True, lora_dropout=dropout)
    model = lorakit.get_peft_model(Net(bias).to(dtype), cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # away from init: B != 0, m != ||W + s B A||
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.3)
    return model


def _run(model, x, reference: bool):
    """(output, grad_fn name, {param name: grad}, dL/dx) for a loss with per-element weights."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with use_reference(reference):
        out = model(x)
    weights = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
    ((out.float() * weights).sum() + out.float().pow(2).mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), type(out.grad_fn).__name__, grads, x.grad


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(6, 24), (2, 5, 24)])
def test_float32_matches_the_reference_path(bias, shape):
    model = _model(bias)
    x = torch.randn(*shape)
    out, node, grads, dx = _run(model, x, reference=False)
    ref_out, ref_node, ref_grads, ref_dx = _run(model, x, reference=True)
    assert node == FUSED and ref_node != FUSED
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, ref_dx, atol=1e-5, rtol=1e-5)
    assert any("lora_magnitude_vector" in n for n in grads)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name  # float32 masters keep float32 grads
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("bias", [True, False])
def test_bfloat16_matches_the_reference_path(bias):
    model = _model(bias, dtype=torch.bfloat16)
    x = torch.randn(3, 16, 24).to(torch.bfloat16)
    out, node, grads, dx = _run(model, x, reference=False)
    ref_out, _, ref_grads, ref_dx = _run(model, x, reference=True)
    assert node == FUSED and out.dtype == torch.bfloat16
    assert _rel(out, ref_out) < 1e-2
    assert _rel(dx, ref_dx) < 1e-2
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        assert _rel(grad, ref_grads[name]) < 2e-2, name


def _formula64(x, weight, bias, lora_a, lora_b, magnitude, s):
    """DoRA in float64 with plain autograd: y = b + (m / ||W + s B A||_detached) (W + s B A) x."""
    adapted = weight + s * lora_b @ lora_a
    k = magnitude / adapted.norm(dim=1).detach()
    y = k * (x @ adapted.T)
    return y if bias is None else y + bias


@pytest.mark.parametrize("bias", [True, False])
def test_function_gradients_match_float64_autograd_including_a_trainable_bias(bias):
    g = torch.Generator().manual_seed(3)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x, weight, lora_a, lora_b = rnd(2, 7, 12), rnd(10, 12), rnd(3, 12), rnd(10, 3)
    magnitude, b = rnd(10).abs() + 0.5, (rnd(10) if bias else None)
    leaves = [t.requires_grad_(True) for t in (x, lora_a, lora_b, magnitude) + ((b,) if bias else ())]
    got = fused_dora_linear(x, weight, b, lora_a, lora_b, magnitude, 0.8)
    want = _formula64(x, weight, b, lora_a, lora_b, magnitude, 0.8)
    assert type(got.grad_fn).__name__ == FUSED
    torch.testing.assert_close(got, want)
    cot = rnd(*got.shape)
    for a, c in zip(torch.autograd.grad(got, leaves, cot), torch.autograd.grad(want, leaves, cot), strict=True):
        torch.testing.assert_close(a, c)


def test_magnitude_at_and_near_zero_keeps_finite_exact_gradients():
    """k = 0 (m = 0) and tiny negative k: the output is (to 1e-12 |z|) 0 and dm = sum(g z) / n still holds."""
    g = torch.Generator().manual_seed(4)
    x, weight = torch.randn(9, 12, generator=g), torch.randn(6, 12, generator=g)
    lora_a, lora_b = torch.randn(3, 12, generator=g), torch.randn(6, 3, generator=g)
    magnitude = torch.tensor([0.0, -1e-14, 1e-13, 1.0, -0.5, 2.0])
    leaves = [t.requires_grad_(True) for t in (lora_a, lora_b, magnitude)]
    got = fused_dora_linear(x, weight, None, lora_a, lora_b, magnitude, 0.5)
    want = _formula64(*(t.double() for t in (x, weight)), None, *(t.double() for t in leaves), 0.5)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    cot = torch.randn(got.shape, generator=g)
    grads = torch.autograd.grad(got, leaves, cot)
    ref = torch.autograd.grad(want, leaves, cot.double())
    assert all(torch.isfinite(t).all() for t in grads)
    for a, c in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)


def test_inference_path_builds_no_graph_and_matches_training_output():
    model = _model()
    x = torch.randn(4, 24)
    out, node, _, _ = _run(model, x, reference=False)
    assert node == FUSED
    with torch.no_grad():
        inferred = model(x)
    assert inferred.grad_fn is None
    torch.testing.assert_close(inferred, out, atol=1e-6, rtol=1e-6)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = model(x)  # grad mode on, nothing requires grad: no node either
    assert frozen.grad_fn is None
    torch.testing.assert_close(frozen, out, atol=1e-6, rtol=1e-6)


def test_merged_disabled_dropout_and_trainable_weight_take_the_reference_path():
    x = torch.randn(5, 24)
    model = _model()
    with use_reference():
        expected = model(x).detach()
    layer = model.base_model.model.lin
    layer.merge()
    merged = model(x)
    assert type(merged.grad_fn).__name__ != FUSED
    torch.testing.assert_close(merged.detach(), expected, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    with model.disable_adapter():
        disabled = model(x)
        assert type(disabled.grad_fn).__name__ != FUSED
    torch.testing.assert_close(disabled, layer.base_layer(x))
    unmerged = model(x)  # after unmerge W changed in place and back: the cached ||W||^2 must follow
    assert type(unmerged.grad_fn).__name__ == FUSED
    torch.testing.assert_close(unmerged.detach(), expected, atol=1e-5, rtol=1e-5)

    dropped = _model(dropout=0.5)
    dropped.train()
    assert type(dropped(x).grad_fn).__name__ != FUSED  # active dropout: the reference recomputes W x'
    dropped.eval()
    assert type(dropped(x).grad_fn).__name__ == FUSED  # eval: dropout is off

    layer.base_layer.weight.requires_grad_(True)
    _, node, grads, _ = _run(model, x, reference=False)
    assert node != FUSED and grads["base_model.model.lin.base_layer.weight"] is not None


def test_cached_weight_norm_follows_in_place_edits_and_replacement():
    model = _model()
    layer = model.base_model.model.lin
    x = torch.randn(3, 24)
    model(x)  # fills the cache
    with torch.no_grad():
        layer.base_layer.weight.mul_(1.5)
    with use_reference():
        expected = model(x)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    layer.base_layer.weight = nn.Parameter(torch.randn(20, 24), requires_grad=False)
    with use_reference():
        expected = model(x)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_float16_takes_the_reference_path():
    model = _model(dtype=torch.float16)
    out = model(torch.randn(3, 24).to(torch.float16))
    assert type(out.grad_fn).__name__ != FUSED


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    model = _model()
    x = torch.randn(2, 6, 24, requires_grad=True)
    plain = _run(model, x, reference=False)[2]
    model.zero_grad(set_to_none=True)
    out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=use_reentrant)
    weights = torch.linspace(-1.0, 1.0, out.numel()).reshape(out.shape)
    ((out * weights).sum() + out.pow(2).mean()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, plain[name], atol=1e-6, rtol=1e-6, msg=name)
