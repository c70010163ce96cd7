"""LoRA+ (arXiv:2402.12354): the same parameter groups as peft's create_loraplus_optimizer, the same training
trajectory, and clear errors."""

from __future__ import annotations

import pytest
import torch
from opt_cases import named_groups, pair, train
from peft.optimizers import create_loraplus_optimizer as peft_create

import lorakit
from lorakit.optimizers import create_loraplus_optimizer
from models import MLP

CASES = {
    # Conv1D + embedding LoRA, a LayerNorm in modules_to_save (no decay), trainable base biases, lora_B biases
    "gpt2": dict(
        target_modules=["c_attn", "wte"],
        modules_to_save=["ln_f"],
        bias="lora_only",
        r=4,
        lora_alpha=8,
    ),
    # DoRA magnitudes (1-D, decaying) on Linear and Embedding, a full matrix in modules_to_save
    "llama": dict(
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
        use_dora=True,
        r=4,
        lora_alpha=8,
    ),
}
ARGS = dict(lr=1e-3, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.05, loraplus_lr_embedding=1e-4)


@pytest.mark.parametrize("kind", list(CASES))
def test_param_groups_match_peft(kind):
    ours, ref = pair(kind, **CASES[kind])
    got = named_groups(ours, create_loraplus_optimizer(ours, torch.optim.AdamW, **ARGS))
    expected = named_groups(ref, peft_create(ref, torch.optim.AdamW, **ARGS))
    assert got == expected
    # gpt2 fills all four groups; llama (DoRA, no biases) has no non-decaying B parameter
    assert [len(g["params"]) > 0 for g in got] == [True, True, True, kind == "gpt2"]


@pytest.mark.parametrize("kind", list(CASES))
def test_training_steps_match_peft(kind):
    ours, ref = pair(kind, **CASES[kind])
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    train(ours, create_loraplus_optimizer(ours, torch.optim.AdamW, **ARGS), kind)
    train(ref, peft_create(ref, torch.optim.AdamW, **ARGS), kind)
    ref_params = dict(ref.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param, ref_params[name], atol=1e-6, rtol=0, msg=name)
    assert all(not torch.equal(before[n], p) for n, p in ours.named_parameters() if n in before)


def test_b_moves_ratio_times_faster_than_a_on_the_first_adam_step():
    """Adam's first step moves every entry by about its lr, so B's step is ratio times A's."""
    ours, _ = pair("mlp", target_modules=["lin0"], r=2)
    layer = ours.base_model.model.lin0
    a0, b0 = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
    train(ours, create_loraplus_optimizer(ours, torch.optim.Adam, lr=1e-3, loraplus_lr_ratio=8.0), "mlp", steps=1)
    step_a = (layer.lora_A["default"].weight - a0).abs().max().item()
    step_b = (layer.lora_B["default"].weight - b0).abs().max().item()
    assert step_a == pytest.approx(1e-3, rel=1e-3)
    assert step_b == pytest.approx(8e-3, rel=1e-3)


def test_extra_kwargs_reach_the_optimizer():
    ours, _ = pair("mlp", target_modules=["lin0"], r=2)
    opt = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4.0, betas=(0.8, 0.9))
    assert all(g["betas"] == (0.8, 0.9) for g in opt.param_groups)
    assert opt.defaults["lr"] == 1e-3


@pytest.mark.parametrize("ratio", [0, -2.0])
def test_non_positive_ratio_is_rejected(ratio):
    ours, _ = pair("mlp", target_modules=["lin0"], r=2)
    with pytest.raises(ValueError, match=rf"loraplus_lr_ratio must be > 0.*got {ratio}"):
        create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=ratio)


def test_model_without_lora_parameters_is_rejected():
    with pytest.raises(ValueError, match=r"no trainable LoRA parameters in MLP \(5 trainable"):
        create_loraplus_optimizer(MLP(), torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    frozen = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"], inference_mode=True))
    with pytest.raises(ValueError, match="no trainable LoRA parameters"):
        create_loraplus_optimizer(frozen, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
