"""The Triton steps of the fused DoRA Linear (kernels/dora_triton.py) against its torch path, on random inputs.

Runs on CUDA with Triton; on a CPU with Triton installed, ``TRITON_INTERPRET=1`` runs the kernel tests too.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from lorakit.kernels import dora_triton
from lorakit.kernels.dora_linear import _K_FLOOR, dora_factors, fused_dora_linear
from lorakit.kernels.switch import triton_available

ON_CUDA = triton_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if ON_CUDA else "cpu"
needs_kernels = pytest.mark.skipif(not (ON_CUDA or INTERPRET), reason="needs CUDA + Triton (or TRITON_INTERPRET=1)")
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="needs CUDA + Triton")


def _case(out=37, d_in=48, rank=12, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE)

    weight = rnd(out, d_in, scale=d_in**-0.5).to(dtype)
    lora_a, lora_b = rnd(rank, d_in, scale=d_in**-0.5), rnd(out, rank, scale=0.3)
    magnitude = rnd(out).abs() + 0.5
    wsq = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square()
    return weight, lora_a, lora_b, magnitude, wsq


@needs_kernels
@pytest.mark.parametrize("rank", [4, 12, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_factors_kernel_matches_float64_math_and_the_torch_path(rank, dtype):
    """Held to the float64 value of the same formula on the same inputs (W A^T as the kernel gets it); the torch
    path only to 1e-3, since CUDA may run its float32 GEMMs in TF32."""
    weight, lora_a, lora_b, magnitude, wsq = _case(rank=rank, dtype=dtype)
    s = 0.7
    a32 = lora_a.float()
    wa = weight @ a32.t().to(dtype)
    k_col, ks_col, inv, kb = dora_triton.triton_factors(wa, lora_b, a32 @ a32.t(), wsq, magnitude, s, _K_FLOOR, dtype)
    a64, b64, wa64 = lora_a.double(), lora_b.double(), wa.double()
    n2 = wsq.double() + 2 * s * (b64 * wa64).sum(1) + s * s * ((b64 @ (a64 @ a64.T)) * b64).sum(1)
    k64 = magnitude.double() / n2.sqrt() + _K_FLOOR
    torch.testing.assert_close(k_col.reshape(-1).double(), k64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ks_col.reshape(-1).double(), s * k64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inv.reshape(-1).double(), 1 / (k64 * n2.sqrt()), rtol=1e-5, atol=1e-6)
    assert kb.dtype == dtype
    tol = dict(rtol=1e-2, atol=1e-4) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kb.double(), b64 * (s * k64)[:, None], **tol)
    ref = dora_factors(weight, wsq, lora_a, lora_b, magnitude, s, dtype, with_inverse=True)
    torch.testing.assert_close(k_col, ref[0], rtol=1e-3, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("n", [1, 37, 1000])
def test_magnitude_grad_kernel_matches_torch(bias, n):
    g = torch.Generator().manual_seed(n)
    out = 150
    grad = torch.randn(n, out, generator=g).to(DEVICE, torch.bfloat16)
    y = torch.randn(n, out, generator=g).to(DEVICE, torch.bfloat16)
    b = torch.randn(out, generator=g).to(DEVICE, torch.bfloat16) if bias else None
    inv = (torch.rand(out, 1, generator=g) + 0.5).to(DEVICE)
    dm, db = dora_triton.triton_magnitude_grad(grad, y, b, inv, with_bias_grad=True)
    g32, y32 = grad.float(), y.float()
    want = (g32 * (y32 - (0 if b is None else b.float()))).sum(0) * inv.reshape(-1)
    torch.testing.assert_close(dm, want, rtol=1e-4, atol=1e-4)
    if bias:
        torch.testing.assert_close(db, g32.sum(0), rtol=1e-4, atol=1e-4)
    else:
        assert db is None


@needs_cuda
@pytest.mark.parametrize("mode", ["1", "auto"])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_node_with_triton_matches_the_torch_path_on_cuda(bias, mode, monkeypatch):
    weight, lora_a, lora_b, magnitude, _ = _case(out=300, d_in=256, rank=16)
    b = torch.randn(300, device="cuda").to(torch.bfloat16) if bias else None
    x = torch.randn(4, 64, 256, device="cuda").to(torch.bfloat16)
    results = []
    monkeypatch.setattr(dora_triton, "GRAD_MIN_ELEMENTS", 0)  # "auto" takes the kernel at this small size too
    for setting in (mode, "0"):
        monkeypatch.setattr(dora_triton, "MODE", setting)
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, lora_a, lora_b, magnitude)]
        y = fused_dora_linear(leaves[0], weight, b, *leaves[1:], 0.5)
        cot = torch.randn(y.shape, generator=torch.Generator(device="cuda").manual_seed(1), device="cuda")
        results.append((y, torch.autograd.grad(y, leaves, cot.to(y.dtype))))
    (y1, g1), (y2, g2) = results
    torch.testing.assert_close(y1.float(), y2.float(), rtol=2e-2, atol=2e-2)
    monkeypatch.setattr(dora_triton, "MODE", mode)
    with torch.no_grad():  # the inference path takes the same factors
        inferred = fused_dora_linear(x, weight, b, lora_a, lora_b, magnitude, 0.5)
    torch.testing.assert_close(inferred, y1.detach())
    for a, c in zip(g1, g2, strict=True):
        assert ((a.float() - c.float()).norm() / c.float().norm()).item() < 1e-2


def test_an_unknown_mode_names_the_settings(monkeypatch):
    monkeypatch.setattr(dora_triton, "MODE", "yes")
    with pytest.raises(ValueError, match=r"LORAKIT_DORA_TRITON='yes'.*0, auto, 1"):
        dora_triton.use_triton_grad(torch.zeros(1, 4), 4)


@pytest.mark.parametrize(
    ("mode", "rows", "out", "factors", "grad"),
    [
        ("auto", 8192, 5632, False, True),  # 46M elements: the saved passes outweigh the launch
        ("auto", 8192, 2048, False, False),  # 16.8M: the three torch ops
        ("1", 16, 16, True, True),
        ("0", 8192, 5632, False, False),
    ],
)
def test_modes_pick_the_triton_steps_by_setting_and_size(mode, rows, out, factors, grad, monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(dora_triton, "MODE", mode)
    monkeypatch.setattr(dora_triton, "triton_available", lambda: True)
    x = SimpleNamespace(is_cuda=True, shape=(rows, 64))
    assert dora_triton.use_triton(x) is factors
    assert dora_triton.use_triton_grad(x, out) is grad
    assert dora_triton.use_triton_grad(SimpleNamespace(is_cuda=False, shape=(rows, 64)), out) is False
