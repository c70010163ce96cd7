"""Under autocast, a model already in autocast's dtype (a bfloat16 model with the transformers Trainer's bf16=True)
keeps the fast paths: fused nodes run with autocast off inside them and give the reference path's results; a model
autocast would cast (float32 under bfloat16 autocast) stays on the reference path."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.kernels import use_reference
from models import tiny_llama
from training_helpers import autograd_node_names

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model(dtype: torch.dtype, use_dora: bool, device: str = "cpu"):
    config = lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, use_dora=use_dora)
    return lorakit.get_peft_model(tiny_llama().to(device=device, dtype=dtype), config).train()


def _loss_and_grads(model, ids) -> tuple[torch.Tensor, list[torch.Tensor], set[str]]:
    model(input_ids=ids, labels=ids)  # a first call: batched casts and shared-input groups form from the second
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    names = set(autograd_node_names(loss))
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, names


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_bf16_model_under_bf16_autocast_takes_the_fused_nodes(use_dora, device):
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0)).to(device)
    model = _model(torch.bfloat16, use_dora, device)
    loss, grads, names = _loss_and_grads(model, ids)
    fused = {"FusedDoraLinearBackward"} if use_dora else {"SharedInputLoraBackward", "FusedLoraLinearBackward"}
    assert fused <= names, names
    with use_reference():
        ref_loss, ref_grads, ref_names = _loss_and_grads(model, ids)
    assert not fused & ref_names
    torch.testing.assert_close(loss, ref_loss, atol=2e-2, rtol=1e-2)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=5e-2)  # bfloat16 end to end, other rounding order


@pytest.mark.parametrize("device", DEVICES)
def test_float32_model_under_bf16_autocast_stays_on_the_reference_path(device):
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1)).to(device)
    _, _, names = _loss_and_grads(_model(torch.float32, False, device), ids)
    assert not {"SharedInputLoraBackward", "FusedLoraLinearBackward"} & names
