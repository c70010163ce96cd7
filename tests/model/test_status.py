"""get_layer_status / get_model_status equal peft's on the same model states (set_adapter, merge, disable,
inconsistent layers, modules_to_save and trainable tokens, other layer types, models injected in place)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import peft
import pytest
import torch

import lorakit
from models import BUILDERS

LLAMA = dict(
    target_modules=["q_proj", "v_proj"],
    modules_to_save=["lm_head"],
    trainable_token_indices={"embed_tokens": [1, 2]},
    task_type="CAUSAL_LM",
)
OTHER = dict(target_modules=["q_proj", "up_proj"], task_type="CAUSAL_LM")


def _pair(kind: str, config: dict, other: dict | None = None):
    """The same adapters in peft and in lorakit on identical base models."""
    models = []
    for lib in (peft, lorakit):
        model = lib.get_peft_model(BUILDERS[kind](), lib.LoraConfig(**config))
        if other is not None:
            model.add_adapter("other", lib.LoraConfig(**other))
        models.append(model)
    return models


def _q_proj(model):
    return model.base_model.model.model.layers[0].self_attn.q_proj


def _assert_same(theirs, ours, where: str = "") -> None:
    their_layers = [dataclasses.asdict(s) for s in peft.get_layer_status(theirs)]
    our_layers = [dataclasses.asdict(s) for s in lorakit.get_layer_status(ours)]
    assert our_layers == their_layers, where
    assert dataclasses.asdict(lorakit.get_model_status(ours)) == dataclasses.asdict(peft.get_model_status(theirs)), (
        where
    )


STATES: dict[str, Callable] = {
    "fresh": lambda m: None,
    "set_other": lambda m: m.set_adapter("other"),
    "merged": lambda m: m.merge_adapter(),
    "merged_other_only": lambda m: (m.set_adapter("other"), m.merge_adapter()),
    "one_layer_switched": lambda m: _q_proj(m).set_adapter("other"),  # active adapters "irregular"
    "one_layer_disabled": lambda m: _q_proj(m).enable_adapters(False),  # enabled "irregular"
    "grad_irregular": lambda m: _q_proj(m).lora_A["default"].weight.requires_grad_(False),
    "deleted_other": lambda m: m.delete_adapter("other"),
}


@pytest.mark.parametrize("state", list(STATES))
def test_status_matches_peft(state):
    theirs, ours = _pair("llama", LLAMA, OTHER)
    for model in (theirs, ours):
        with contextlib.suppress(UserWarning), torch.no_grad():
            STATES[state](model)
    _assert_same(theirs, ours, state)


NO_SAVED = {k: v for k, v in LLAMA.items() if k != "modules_to_save"}


def test_status_disabled_and_methods():
    theirs, ours = _pair("llama", NO_SAVED, OTHER)
    with theirs.disable_adapter(), ours.disable_adapter():
        _assert_same(theirs, ours, "disable_adapter")
        assert lorakit.get_model_status(ours).enabled is False
    _assert_same(theirs, ours, "re-enabled")
    assert dataclasses.asdict(ours.get_model_status()) == dataclasses.asdict(theirs.get_model_status())
    assert [dataclasses.asdict(s) for s in ours.get_layer_status()] == [
        dataclasses.asdict(s) for s in theirs.get_layer_status()
    ]


@pytest.mark.parametrize(
    "kind, config",
    [
        ("conv", dict(target_modules=["conv1d", "conv2d", "conv3d"], r=2)),
        ("emb", dict(target_modules=["emb", "lin"], r=2)),
        ("mlp", dict(target_modules=["lin0", "lin1"], r=2, modules_to_save=["head"], use_dora=True)),
    ],
)
def test_status_layer_types_match_peft(kind, config):
    theirs, ours = _pair(kind, config)
    _assert_same(theirs, ours, kind)
    assert lorakit.get_model_status(ours).base_model_type == type(BUILDERS[kind]()).__name__


def test_status_disabled_modules_to_save_requires_grad():
    theirs, ours = _pair("llama", LLAMA)
    with theirs.disable_adapter(), ours.disable_adapter():
        _assert_same(theirs, ours, "disable_adapter with modules_to_save")


def _injected(config: dict):
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**config), BUILDERS["mlp"]())
    ours = lorakit.inject_adapter_in_model(lorakit.LoraConfig(**config), BUILDERS["mlp"]())
    return theirs, ours


def test_status_injected_trainable_params():
    theirs, ours = _injected(dict(target_modules=["lin0"], r=2))
    _assert_same(theirs, ours, "injected")


def test_status_of_injected_and_unwrapped_models():
    """A model with adapters injected in place (no PeftModel): base type "other" / the transformers class name."""
    theirs, ours = _injected(dict(target_modules=["lin0"], r=2))
    _assert_same(theirs, ours, "injected")
    assert lorakit.get_model_status(ours).adapter_model_type == "None"
    p_llama, o_llama = _pair("llama", LLAMA)
    _assert_same(p_llama.get_base_model(), o_llama.get_base_model(), "transformers model")
    assert lorakit.get_model_status(o_llama.get_base_model()).base_model_type == "LlamaForCausalLM"


def test_status_without_adapters_raises():
    with pytest.raises(ValueError, match="No adapter layers found in the MLP"):
        lorakit.get_layer_status(BUILDERS["mlp"]())
    with pytest.raises(ValueError, match="No adapter layers"):
        lorakit.get_model_status(BUILDERS["mlp"]())
