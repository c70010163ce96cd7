"""Gradient checkpointing of a lorakit model: reentrant and non-reentrant give the LoRA grads of a plain backward."""

from __future__ import annotations

import pytest
import torch

import lorakit
from models import MLP, tiny_llama


def _tiny_vit():
    """A model whose main input is pixel_values: transformers adds no input-grad hook for it by itself."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    return ViTForImageClassification(config)


CASES = {
    "llama": (
        tiny_llama,
        dict(target_modules=["q_proj", "v_proj", "down_proj"], r=4, init_lora_weights=False),
        lambda: {"input_ids": torch.arange(1, 15).reshape(2, 7), "labels": torch.arange(1, 15).reshape(2, 7)},
    ),
    "vit": (
        _tiny_vit,
        dict(target_modules=["q_proj", "v_proj"], r=4, init_lora_weights=False),
        lambda: {
            "pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
            "labels": torch.tensor([0, 2]),
        },
    ),
}


def _lora_grads(kind: str, checkpointing: dict | None, before_wrap: bool = False) -> dict[str, torch.Tensor]:
    build, config, inputs = CASES[kind]
    base = build()
    if before_wrap and checkpointing is not None:
        enable = getattr(base, "activation_checkpointing_enable", None)  # transformers' own method (new name)
        if enable is not None:
            enable(activation_checkpointing_kwargs=checkpointing)
        else:  # transformers before the rename
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(**config))
    if checkpointing is not None and not before_wrap:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    model.train()
    layer = next(m for _, m in model.base_model.lora_layers())
    calls = []
    layer.register_forward_hook(lambda *_: calls.append(1))
    model(**inputs()).loss.backward()
    assert len(calls) == (2 if checkpointing is not None else 1)  # checkpointing recomputes the layer in backward
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("kind", list(CASES))
def test_checkpointed_lora_grads_equal_plain_grads(kind, reentrant):
    expected = _lora_grads(kind, None)
    got = _lora_grads(kind, {"use_reentrant": reentrant})
    assert set(got) == set(expected) and all("lora_" in n for n in got)
    for name, grad in expected.items():
        assert got[name] is not None, f"{name} got no gradient"
        torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-5)


def test_checkpointing_enabled_before_wrapping_gets_the_input_grad_hook():
    expected = _lora_grads("vit", None)
    got = _lora_grads("vit", {"use_reentrant": True}, before_wrap=True)
    for name, grad in expected.items():
        assert got[name] is not None, f"{name} got no gradient"
        torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-5)


def test_model_without_checkpointing_support_gets_a_clear_error():
    model = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"], r=2))
    with pytest.raises(ValueError, match="MLP does not support gradient checkpointing"):
        model.gradient_checkpointing_enable()
