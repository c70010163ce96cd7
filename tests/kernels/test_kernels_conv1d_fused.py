"""The fused LoRA node on transformers' Conv1D (GPT-2: weight stored (in, out), taken as a transposed view): taken
for plain LoRA, equal to the reference path and to peft, DoRA and hooked bases left to the reference path."""

import peft
import pytest
import torch

import lorakit
from lorakit.kernels import use_reference
from models import tiny_gpt2


def _pair(dtype, **settings):
    config = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights=False, **settings)
    torch.manual_seed(0)
    ref = peft.get_peft_model(tiny_gpt2().to(dtype), peft.LoraConfig(**config))
    ours = lorakit.get_peft_model(tiny_gpt2().to(dtype), lorakit.LoraConfig(**config))
    with torch.no_grad():
        mine = dict(ours.named_parameters())
        for name, param in ref.named_parameters():
            if "lora_" in name:
                mine[name].copy_(param)
    return ours, ref


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_conv1d_equals_reference_and_peft(dtype):
    ours, ref = _pair(dtype)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    c_attn = ours.base_model.model.transformer.h[0].attn.c_attn
    out = c_attn(torch.randn(2, 9, 32, dtype=dtype, requires_grad=True))
    assert type(out.grad_fn).__name__ == "FusedLoraLinearBackward"  # the fused node is taken for Conv1D
    loss, grads = _loss_and_grads(ours, ids)
    with use_reference():
        ref_loss, ref_grads = _loss_and_grads(ours, ids)
    peft_loss, peft_grads = _loss_and_grads(ref, ids)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(loss, ref_loss, **tol)
    torch.testing.assert_close(loss, peft_loss, **tol)
    assert grads.keys() == ref_grads.keys() == peft_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=name)
        torch.testing.assert_close(grads[name], peft_grads[name], **tol, msg=name)
    with torch.no_grad():  # inference: the same node's no-graph path
        torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits, **tol)


def test_dora_and_hooked_conv1d_take_the_reference_path():
    ours, _ = _pair(torch.float32, use_dora=True)
    c_attn = ours.base_model.model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 5, 32, requires_grad=True)
    assert type(c_attn(x).grad_fn).__name__ != "FusedLoraLinearBackward"
    plain, _ = _pair(torch.float32)
    layer = plain.base_model.model.transformer.h[0].attn.c_attn
    layer.base_layer.register_forward_hook(lambda module, args, out: out * 2)
    with torch.no_grad():
        hooked = layer(x)
        with use_reference():
            want = layer(x)
    torch.testing.assert_close(hooked, want)  # the hook ran: the fused node would have skipped it
