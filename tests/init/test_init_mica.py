"""init_lora_weights="mica" (arXiv:2604.01694): factors, frozen B, training, checkpoints both ways, vs peft."""

from __future__ import annotations

import peft
import pytest
import torch

import lorakit
from models import tiny_gpt2, tiny_llama

IDS = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
TARGETS = {"llama": (tiny_llama, ["q_proj", "down_proj", "embed_tokens"]), "gpt2": (tiny_gpt2, ["c_attn", "wte"])}


def _pair(case: str, **kwargs):
    build, targets = TARGETS[case]
    config = dict(r=4, target_modules=targets, init_lora_weights="mica", **kwargs)
    return peft.get_peft_model(build(), peft.LoraConfig(**config)), lorakit.get_peft_model(
        build(), lorakit.LoraConfig(**config)
    )


@pytest.mark.parametrize("case", list(TARGETS))
def test_factors_and_trainable_flags_equal_peft(case):
    theirs, ours = _pair(case)
    ref = dict(theirs.named_parameters())
    mine = dict(ours.named_parameters())
    assert sorted(ref) == sorted(mine)
    for name, param in ref.items():
        torch.testing.assert_close(mine[name], param, rtol=0, atol=1e-6, msg=name)
        assert mine[name].requires_grad == param.requires_grad, name
    frozen_b = [n for n, p in mine.items() if "lora_B" in n or "lora_embedding_B" in n]
    assert frozen_b and not any(mine[n].requires_grad for n in frozen_b)
    b = ours.base_model.model.get_input_embeddings().lora_embedding_B["default"]
    assert b.abs().sum() > 0  # B holds the minor singular vectors, A is zero


def test_b_is_the_minor_left_singular_vectors():
    _, ours = _pair("llama")
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    weight = layer.base_layer.weight.detach()
    b = layer.lora_B["default"].weight.detach()
    s = torch.linalg.svdvals(weight)
    torch.testing.assert_close(b.T @ b, torch.eye(4), rtol=0, atol=1e-5)  # orthonormal columns
    # B spans the last 4 left singular vectors: projecting W^T onto B keeps exactly the 4 smallest singular values
    torch.testing.assert_close(torch.linalg.svdvals(b.T @ weight), s[-4:], rtol=1e-4, atol=1e-5)
    assert torch.count_nonzero(layer.lora_A["default"].weight) == 0


def test_training_moves_a_only_and_matches_peft():
    theirs, ours = _pair("llama")
    for model in (theirs, ours):
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(2):
            opt.zero_grad()
            model(input_ids=IDS, labels=IDS).loss.backward()
            opt.step()
    layer_t = theirs.base_model.model.model.layers[0].self_attn.q_proj
    layer_o = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(layer_o.lora_A["default"].weight) > 0
    torch.testing.assert_close(layer_o.lora_A["default"].weight, layer_t.lora_A["default"].weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer_o.lora_B["default"].weight, layer_t.lora_B["default"].weight, rtol=0, atol=1e-6)
    ours.set_adapter("default")  # re-activating keeps B frozen
    ours.base_model.set_requires_grad("default")
    assert not layer_o.lora_B["default"].weight.requires_grad and layer_o.lora_A["default"].weight.requires_grad


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_checkpoints_load_both_ways_with_b_frozen(tmp_path, low_cpu_mem_usage):
    theirs, ours = _pair("llama")
    with torch.no_grad():
        for model in (theirs, ours):
            for name, param in model.named_parameters():
                if "lora_A" in name or "lora_embedding_A" in name:
                    param.copy_(torch.randn_like(param))
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    loaded = lorakit.PeftModel.from_pretrained(
        tiny_llama(), tmp_path / "peft", is_trainable=True, low_cpu_mem_usage=low_cpu_mem_usage
    )
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, theirs.eval()(input_ids=IDS).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(back(input_ids=IDS).logits, ours.eval()(input_ids=IDS).logits, atol=1e-5, rtol=0)
    layer = loaded.base_model.model.model.layers[1].mlp.down_proj
    assert layer.lora_A["default"].weight.requires_grad and not layer.lora_B["default"].weight.requires_grad


def test_unsupported_layers_and_ranks_are_refused():
    with pytest.raises(ValueError, match="init_lora_weights='mica' takes the last r left singular vectors"):
        lorakit.get_peft_model(
            tiny_llama(), lorakit.LoraConfig(r=40, target_modules=["q_proj"], init_lora_weights="mica")
        )
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="cannot initialise layer '0' of kind 'conv'; it supports: embedding, linear"):
        lorakit.get_peft_model(conv, lorakit.LoraConfig(r=2, target_modules=["0"], init_lora_weights="mica"))
