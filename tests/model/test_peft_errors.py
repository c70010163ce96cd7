"""Settings peft refuses are refused here too, with the same exception class and a message naming the problem."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
import torch.nn as nn

import lorakit
from models import tiny_llama


class WithContainers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4)])
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 4)})
        self.extra = nn.ParameterDict({"a": nn.Parameter(torch.zeros(2))})
        self.more = nn.ParameterList([nn.Parameter(torch.zeros(2))])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads["a"](self.blocks[0](self.lin0(x)))


def _both_raise(build, error: type[Exception], match: str) -> None:
    """peft raises ``error`` for ``build(lib)``; lorakit raises the same class with a message matching ``match``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error):
            build(peft)
        with pytest.raises(error, match=match):
            build(lorakit)


@pytest.mark.parametrize("container", ["blocks", "heads", "extra", "more"])
def test_containers_in_modules_to_save(container):
    def build(lib):
        config = lib.LoraConfig(target_modules=["lin0"], modules_to_save=[container])
        return lib.get_peft_model(WithContainers(), config)

    _both_raise(build, TypeError, r"modules_to_save cannot be applied to modules of type .*container has no forward")


def test_modules_to_save_naming_a_lora_layer_of_another_adapter():
    def build(lib):
        model = lib.get_peft_model(WithContainers(), lib.LoraConfig(target_modules=["lin0"]))
        model.add_adapter("other", lib.LoraConfig(target_modules=["blocks.0"], modules_to_save=["lin0"]))

    _both_raise(build, TypeError, r"module 'lin0': it is a LoRA layer of adapter\(s\) \['default'\]")


@pytest.mark.parametrize("value", ["experts.gate_up_proj", ["experts.gate_up_proj", 3]])
def test_target_parameters_must_be_a_list_of_strings(value):
    with pytest.raises(TypeError, match="must be a list of strings"):
        peft.LoraConfig(target_parameters="experts.gate_up_proj")
    with pytest.raises(TypeError, match=r"`target_parameters` must be a list of strings or None, got"):
        lorakit.LoraConfig(target_parameters=value)


def test_two_active_adapters_training_the_same_token_ids():
    def build(lib):
        model = lib.get_peft_model(
            tiny_llama(), lib.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 2])
        )
        model.add_adapter("other", lib.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[2, 3]))
        model.base_model.set_adapter(["default", "other"])
        model(input_ids=torch.tensor([[1, 2, 3]]))

    _both_raise(build, ValueError, "both train token 2")


def test_alora_forward_with_beams():
    def build(lib):
        config = lib.LoraConfig(target_modules=["q_proj"], alora_invocation_tokens=[5], task_type="CAUSAL_LM")
        model = lib.get_peft_model(tiny_llama(), config)
        model(input_ids=torch.tensor([[1, 5, 3, 4]]), num_beams=2)

    _both_raise(build, ValueError, r"Beam search is not supported with aLoRA adapters \(\['default'\]\)")
    config = lorakit.LoraConfig(target_modules=["q_proj"], alora_invocation_tokens=[5], task_type="CAUSAL_LM")
    model = lorakit.get_peft_model(tiny_llama(), config)
    model(input_ids=torch.tensor([[1, 5, 3, 4]]), num_beams=1)  # one beam is greedy: allowed
