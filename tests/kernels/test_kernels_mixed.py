"""Gathered mixed-adapter paths against the references: kernels on stacks, and whole models with adapter_names."""

from __future__ import annotations

import pytest
import torch

import lorakit.kernels.mixed_dispatch as mixed_dispatch
from lorakit import LoraConfig, get_peft_model
from lorakit.kernels import use_reference
from lorakit.kernels.adapter_stack import adapter_stack
from lorakit.kernels.gathered import gather_factors, gathered_lora, reference_gathered_lora
from models import tiny_llama


def _stacks(slots=4, rows=6, length=5, d_in=24, d_out=20, rank=8):
    x = torch.randn(rows, length, d_in)
    a = torch.randn(slots, rank, d_in)
    b = torch.randn(slots, d_out, rank)
    return x, a, b, torch.randint(0, slots, (rows,))


def test_gathered_matches_row_by_row_reference():
    x, a, b, slots = _stacks()
    bias = torch.randn(20)
    fast = gathered_lora(x, *gather_factors(a, b, slots), bias)
    ref = reference_gathered_lora(x, a, b, slots) + bias
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(
    not __import__("lorakit.kernels", fromlist=["triton_available"]).triton_available(), reason="needs CUDA + Triton"
)
@pytest.mark.parametrize("length", [1, 7, 130])
def test_triton_sgmv_matches_reference_on_cuda(length):
    from lorakit.kernels.sgmv_triton import triton_gathered_lora

    x, a, b, slots = _stacks(slots=5, rows=9, length=length, d_in=1100, d_out=300, rank=16)
    x, a, b, slots = (t.cuda() for t in (x, a, b, slots))
    x, a, b = x.bfloat16(), (a / 33).bfloat16(), b.bfloat16()
    bias = torch.randn(300, device="cuda", dtype=torch.bfloat16)
    fast = triton_gathered_lora(x, a, b, slots, bias).float()
    ref = reference_gathered_lora(x.float(), a.float(), b.float(), slots) + bias.float()
    assert ((fast - ref).norm() / ref.norm()) < 1e-2


def _mixed_model(dtype=torch.float32):
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_llama().to(dtype), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    )
    model.add_adapter("small", LoraConfig(r=2, lora_alpha=5, target_modules="all-linear", init_lora_weights=False))
    model.add_adapter(  # only some layers: rows with it get the base output elsewhere
        "attn_only", LoraConfig(r=16, target_modules=["q_proj", "v_proj"], use_rslora=True, init_lora_weights=False)
    )
    return model.eval()


NAMES = ["small", "default", "__base__", "attn_only", "default", "small"]


def _logits(model, ids, names, reference):
    with torch.no_grad(), use_reference(reference):
        return model(input_ids=ids, adapter_names=names).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_matches_reference_and_separate_runs(monkeypatch, dtype):
    model = _mixed_model(dtype)
    ids = torch.randint(0, 96, (len(NAMES), 9))
    calls = {"n": 0}
    original = mixed_dispatch.gathered_lora

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(mixed_dispatch, "gathered_lora", counting)
    fast = _logits(model, ids, NAMES, reference=False).float()
    assert calls["n"] == 14
    ref = _logits(model, ids, NAMES, reference=True).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((fast - ref).norm() / ref.norm()) < tol
    if dtype != torch.float32:
        return
    model.base_model.set_adapter("small")
    with torch.no_grad(), use_reference():
        alone = model(input_ids=ids[:1]).logits.float()
    assert ((fast[:1] - alone).norm() / alone.norm()) < tol


def test_stack_is_rebuilt_when_adapters_change():
    model = _mixed_model()
    ids = torch.randint(0, 96, (len(NAMES), 6))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    _logits(model, ids, NAMES, reference=False)
    stack = adapter_stack(layer, torch.float32, torch.device("cpu"))
    assert stack.names == ("default", "small", "attn_only") and stack.a.shape == (4, 16, 32)

    def check():
        fast = _logits(model, ids, NAMES, reference=False)
        torch.testing.assert_close(fast, _logits(model, ids, NAMES, reference=True), atol=1e-5, rtol=1e-4)

    with torch.no_grad():
        layer.lora_A["small"].weight.add_(1.0)  # in-place edit (training, load_state_dict)
    check()
    layer.set_scale("default", 2.5)  # runtime rescale
    check()
    model.delete_adapter("attn_only")
    names = [n if n != "attn_only" else "__base__" for n in NAMES]
    fast = _logits(model, ids, names, reference=False)
    torch.testing.assert_close(fast, _logits(model, ids, names, reference=True), atol=1e-5, rtol=1e-4)
    assert adapter_stack(layer, torch.float32, torch.device("cpu")).names == ("default", "small")


def test_gradients_into_adapters_take_the_reference_path():
    model = _mixed_model()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    from lorakit.routing import route_batch

    x = torch.randn(len(NAMES), 3, 32)
    with route_batch(NAMES):
        out = layer(x)
        layer.lora_B["default"].weight.requires_grad_(True)
        out = layer(x)
    out.sum().backward()
    assert layer.lora_B["default"].weight.grad is not None
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0
