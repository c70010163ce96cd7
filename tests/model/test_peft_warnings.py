"""Warnings peft gives that lorakit gives too, on the same condition and with the same warning class."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
import torch.nn as nn

import lorakit
from models import MLP


def _messages(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in seen if issubclass(w.category, UserWarning)]


def _both_warn(build, text: str) -> None:
    """``build(lib)`` makes peft warn with ``text`` and lorakit with a message containing ``text`` too."""
    assert any(text in m for m in _messages(lambda: build(peft))), "peft no longer warns"
    ours = _messages(lambda: build(lorakit))
    assert any(text in m for m in ours), ours


def test_get_peft_model_on_a_model_with_adapters():
    def build(lib):
        model = MLP()
        lib.get_peft_model(model, lib.LoraConfig(target_modules=["lin0"]))
        lib.get_peft_model(model, lib.LoraConfig(target_modules=["lin1"]))

    _both_warn(build, "You are trying to modify a model with PEFT for a second time")
    assert not _messages(lambda: lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"])))


def test_lora_bias_on_a_layer_without_bias():
    def build(lib):
        lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin1"], lora_bias=True))

    _both_warn(build, "has no bias. This means that merging LoRA weights won't be possible.")
    assert not any(
        "has no bias" in m
        for m in _messages(
            lambda: lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"], lora_bias=True))
        )
    )


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora", "corda"])
def test_rslora_with_patterns_and_a_base_changing_init(init):
    def build(lib):
        lib.LoraConfig(init_lora_weights=init, use_rslora=True, rank_pattern={"lin0": 4})

    _both_warn(build, "Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training conversion")
    assert not any("Rank-Stabilized" in m for m in _messages(lambda: lorakit.LoraConfig(init_lora_weights=init)))


def test_disable_adapter_in_an_irregular_state():
    def build(lib):
        model = lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0", "lin1"]))
        model.base_model.model.lin0.enable_adapters(False)
        with model.disable_adapter():
            pass
        return model

    _both_warn(build, "The model contains some adapter layers that are enabled and others that are disabled")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = build(lorakit)
    assert ours.base_model.model.lin0.disable_adapters and not ours.base_model.model.lin1.disable_adapters


def test_merging_a_tied_embedding_unties_it_with_a_warning():
    from transformers import LlamaConfig, LlamaForCausalLM

    def tied():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True,
        )  # fmt: skip
        return LlamaForCausalLM(config)

    def build(lib):
        config = lib.LoraConfig(modules_to_save=["embed_tokens"], target_modules=["q_proj"])
        model = lib.get_peft_model(tied(), config)
        with torch.no_grad():
            model.base_model.model.model.embed_tokens.modules_to_save["default"].weight.add_(1.0)
        merged = model.merge_and_unload()
        assert merged.config.tie_word_embeddings is False
        assert isinstance(merged.lm_head, nn.Linear)

    _both_warn(build, "Input and output embeddings are no longer tied after merging")
