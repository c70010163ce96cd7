"""targeted_module_names / targeted_parameter_names, PeftModel.modules_to_save,
prepare_model_for_gradient_checkpointing and inject_adapter_in_model(state_dict=...), compared with peft."""

from __future__ import annotations

import os
import sys
import warnings

import peft
import pytest
import torch
import torch.nn as nn

import lorakit
from models import MLP, tiny_gpt2, tiny_llama

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "layers"))
from moe_helpers import EXPERT_TARGETS, tiny_moe


def _both(build, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(build(), peft.LoraConfig(**kwargs))
        ours = lorakit.get_peft_model(build(), lorakit.LoraConfig(**kwargs))
    return theirs, ours


@pytest.mark.parametrize(
    ("build", "kwargs"),
    [
        (tiny_llama, dict(target_modules=["q_proj", "v_proj"])),
        (tiny_llama, dict(target_modules="all-linear")),
        (tiny_gpt2, dict(target_modules=["c_attn"], layers_to_transform=[1])),
        (MLP, dict(target_modules=r"lin\d", modules_to_save=["head"])),
    ],
)
def test_targeted_module_names_match_peft(build, kwargs):
    theirs, ours = _both(build, **kwargs)
    assert ours.targeted_module_names == theirs.targeted_module_names
    assert ours.base_model.targeted_module_names == theirs.base_model.targeted_module_names
    assert ours.targeted_parameter_names == theirs.targeted_parameter_names == []


def test_targeted_names_with_a_second_adapter_and_parameters():
    theirs, ours = _both(tiny_moe, target_modules=["router"], target_parameters=EXPERT_TARGETS)
    assert sorted(ours.targeted_parameter_names) == sorted(theirs.targeted_parameter_names)
    assert sorted(ours.targeted_parameter_names) == sorted(EXPERT_TARGETS)
    assert ours.targeted_module_names == theirs.targeted_module_names == ["router"]
    theirs, ours = _both(MLP, target_modules=["lin0"])
    theirs.add_adapter("other", peft.LoraConfig(target_modules=["lin1", "lin0"]))
    ours.add_adapter("other", lorakit.LoraConfig(target_modules=["lin1", "lin0"]))
    assert ours.targeted_module_names == theirs.targeted_module_names == ["lin0", "lin1"]


def test_modules_to_save_property_matches_peft():
    theirs, ours = _both(MLP, target_modules=["lin0"])
    assert ours.modules_to_save is None and theirs.modules_to_save is None
    theirs.add_adapter("other", peft.LoraConfig(target_modules=["lin0"], modules_to_save=["head"]))
    ours.add_adapter("other", lorakit.LoraConfig(target_modules=["lin0"], modules_to_save=["head"]))
    assert ours.modules_to_save == theirs.modules_to_save == {"head"}


def test_prepare_model_for_gradient_checkpointing_like_peft():
    theirs, ours = _both(tiny_llama, target_modules=["q_proj"])
    ids = torch.tensor([[1, 2, 3]])
    for model in (theirs, ours):
        base = model.get_base_model()
        assert not base.get_input_embeddings()(ids).requires_grad
        returned = model.prepare_model_for_gradient_checkpointing(base)
        assert returned is (base if model is ours else None)  # peft returns None; lorakit the model
        assert base(input_ids=ids, output_hidden_states=True).hidden_states[0].requires_grad  # embeddings' output
    quantized = tiny_llama()
    quantized.is_loaded_in_4bit = True
    ours.prepare_model_for_gradient_checkpointing(quantized)
    assert not getattr(quantized, "_require_grads_hooks", None) and not getattr(quantized, "_require_grads_hook", None)


def _trained_state(build, **kwargs):
    torch.manual_seed(0)
    model = peft.inject_adapter_in_model(peft.LoraConfig(init_lora_weights=False, **kwargs), build())
    return peft.get_peft_model_state_dict(model), model


def test_inject_adapter_from_state_dict_like_peft():
    state, _ = _trained_state(tiny_llama, target_modules=["q_proj", "o_proj"], layers_to_transform=[0])
    config = dict(target_modules=["v_proj"], r=8)
    with pytest.warns(RuntimeWarning, match="additional target modules") as theirs_warn:
        theirs = peft.inject_adapter_in_model(peft.LoraConfig(**config), tiny_llama(), state_dict=state)
    with pytest.warns(RuntimeWarning, match="additional target modules") as ours_warn:
        ours = lorakit.inject_adapter_in_model(lorakit.LoraConfig(**config), tiny_llama(), state_dict=state)
    assert str(ours_warn[0].message) == str(theirs_warn[0].message)

    def lora_modules(model: nn.Module) -> list[str]:
        return sorted(n for n, m in model.named_modules() if hasattr(m, "lora_A") and not n.endswith("lora_A"))

    assert (
        lora_modules(ours)
        == lora_modules(theirs)
        == ["model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.q_proj"]
    )
    lorakit.set_peft_model_state_dict(ours, state)
    peft.set_peft_model_state_dict(theirs, state)
    ids = torch.tensor([[4, 8, 15, 16]])
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_inject_adapter_from_state_dict_errors():
    with pytest.raises(ValueError, match="names no module of the model"):
        lorakit.inject_adapter_in_model(lorakit.LoraConfig(target_modules=["lin0"]), MLP(), state_dict={"x.weight": 0})
    state, _ = _trained_state(tiny_moe, target_modules=["lin"])
    config = lorakit.LoraConfig(target_modules=[], target_parameters=EXPERT_TARGETS)
    with pytest.raises(ValueError, match="uses `target_parameters`"):
        lorakit.inject_adapter_in_model(config, tiny_moe(), state_dict=state)
