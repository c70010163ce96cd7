"""The fused LoRA linear node against the readable reference: outputs and gradients on random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lorakit.kernels.lora_linear import FusedLoraLinear, fused_lora_linear, reference_lora_linear

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4)}


def _inputs(dtype, bias=True, n=24, d_in=40, d_out=36, r=8):
    x = torch.randn(n, d_in, dtype=dtype, requires_grad=True)
    weight = torch.randn(d_out, d_in, dtype=dtype) / d_in**0.5
    b = torch.randn(d_out, dtype=dtype) if bias else None
    lora_a = (torch.randn(r, d_in) / d_in**0.5).requires_grad_(True)  # float32 masters
    lora_b = torch.randn(d_out, r).requires_grad_(True)
    return x, weight, b, lora_a, lora_b


def _grads(out, tensors):
    grad_out = torch.randn_like(out)
    return torch.autograd.grad(out, tensors, grad_out)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_matches_reference_outputs_and_gradients(dtype, bias):
    x, weight, b, lora_a, lora_b = _inputs(dtype, bias)
    fast = fused_lora_linear(x, weight, b, lora_a, lora_b, 0.7)
    ref = reference_lora_linear(x, weight, b, lora_a, lora_b, 0.7)
    assert fast.dtype == dtype
    assert _rel(fast, ref) < (1e-6 if dtype == torch.float32 else 1e-2)
    torch.manual_seed(1)
    g_fast = _grads(fast, (x, lora_a, lora_b))
    torch.manual_seed(1)
    g_ref = _grads(ref, (x, lora_a, lora_b))
    for gf, gr in zip(g_fast, g_ref):
        assert gf.dtype == gr.dtype  # float32 masters get float32 grads
        assert _rel(gf, gr) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_dropout_uses_one_mask_for_output_and_all_gradients():
    x, weight, b, lora_a, lora_b = _inputs(torch.float32)
    p = 0.3
    torch.manual_seed(7)
    _, mask = torch.native_dropout(x.detach(), p, True)  # the mask the fused node will draw
    torch.manual_seed(7)
    fast = fused_lora_linear(x, weight, b, lora_a, lora_b, 1.5, p=p)
    ref = reference_lora_linear(x, weight, b, lora_a, lora_b, 1.5, dropout_mask=mask, p=p)
    torch.testing.assert_close(fast, ref, **TOL[torch.float32])
    assert 0 < (~mask).sum() < mask.numel()
    torch.manual_seed(1)
    g_fast = _grads(fast, (x, lora_a, lora_b))
    torch.manual_seed(1)
    g_ref = _grads(ref, (x, lora_a, lora_b))
    for gf, gr in zip(g_fast, g_ref):
        assert _rel(gf, gr) < 1e-5


def test_three_d_input_no_grad_path_and_frozen_parts():
    x, weight, b, lora_a, lora_b = _inputs(torch.float32)
    x3 = x.detach().reshape(4, 6, -1)
    with torch.no_grad():
        fast = fused_lora_linear(x3, weight, b, lora_a, lora_b, 0.5)
    ref = reference_lora_linear(x3.reshape(24, -1), weight, b, lora_a, lora_b, 0.5).reshape(4, 6, -1)
    assert fast.shape == (4, 6, 36)
    torch.testing.assert_close(fast, ref, **TOL[torch.float32])
    # only B trainable, x not requiring grad: A gets nothing, B's grad still exact
    lora_a.requires_grad_(False)
    fast = fused_lora_linear(x3, weight, b, lora_a, lora_b, 0.5)
    (g_fast,) = torch.autograd.grad(fast.square().sum(), lora_b)
    ref = reference_lora_linear(x3, weight, b, lora_a, lora_b, 0.5)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), lora_b)
    assert _rel(g_fast, g_ref) < 1e-5


def test_base_weight_and_bias_gradients_when_unfrozen():
    x, weight, b, lora_a, lora_b = _inputs(torch.float32)
    weight.requires_grad_(True)
    b.requires_grad_(True)
    out = FusedLoraLinear.apply(x, weight, b, lora_a, lora_b, 0.3, 0.0)
    g_fast = torch.autograd.grad(out.sum(), (weight, b))
    ref = reference_lora_linear(x, weight, b, lora_a, lora_b, 0.3)
    g_ref = torch.autograd.grad(ref.sum(), (weight, b))
    for gf, gr in zip(g_fast, g_ref):
        assert _rel(gf, gr) < 1e-5


def test_float64_gradcheck():
    torch.manual_seed(3)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 6, dtype=torch.float64)
    lora_a = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    lora_b = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *t: FusedLoraLinear.apply(t[0], weight, bias, t[1], t[2], 0.8, 0.0), (x, lora_a, lora_b)
    )


def test_fused_node_saves_no_extra_activation_copy():
    """Only x itself (shared with the caller), the N x r intermediate and r-sized factors are kept for backward."""
    x, weight, _, lora_a, lora_b = _inputs(torch.bfloat16, bias=False, n=64, d_in=32, d_out=32, r=4)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused_lora_linear(x, weight, None, lora_a, lora_b, 1.0)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert all(t.data_ptr() in (x.data_ptr(), weight.data_ptr()) for t in big)


def test_module_level_switch_is_respected():
    from lorakit.kernels import fast_paths_enabled, use_reference

    assert fast_paths_enabled()
    with use_reference():
        assert not fast_paths_enabled()
        with use_reference(False):
            assert fast_paths_enabled()
        assert not fast_paths_enabled()
    assert fast_paths_enabled()


def test_eligibility_rejects_what_it_cannot_fuse():
    from lorakit.kernels.eligibility import dropout_probability, plain_linear

    lin = nn.Linear(3, 3)
    assert plain_linear(lin)
    handle = lin.register_forward_hook(lambda *a: None)
    assert not plain_linear(lin)
    handle.remove()
    lin.forward = lambda x: x  # accelerate-style patched forward
    assert not plain_linear(lin)

    class MyLinear(nn.Linear):
        pass

    assert not plain_linear(MyLinear(3, 3))
    drop = nn.Dropout(0.2)
    assert dropout_probability(drop) == pytest.approx(0.2)
    assert dropout_probability(drop.eval()) == 0.0
    assert dropout_probability(nn.Identity()) == 0.0
    assert dropout_probability(nn.AlphaDropout(0.1)) is None


@pytest.mark.parametrize("scale", [1.0, 0.375])
@pytest.mark.parametrize("chunks", [1, 4, 3])
def test_chunked_weight_gradient_equals_one_gemm(chunks, scale):
    from lorakit.kernels.lora_linear import chunked_weight_grad

    left, right = torch.randn(512, 6), torch.randn(512, 40)
    out = chunked_weight_grad(left, right, torch.float32, chunks, scale)  # 3 does not divide 512: one GEMM
    torch.testing.assert_close(out, scale * (left.t() @ right), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_applies_the_scale_once(dtype):
    from lorakit.kernels.lora_linear import scaled_mm

    left, right = torch.randn(33, 7, dtype=dtype), torch.randn(7, 19, dtype=dtype)
    for scale in (1.0, 2.5, -0.5):
        expected = (left.double() @ right.double() * scale).to(dtype)
        torch.testing.assert_close(scaled_mm(left, right, scale), expected, atol=1e-5, rtol=1e-2)
