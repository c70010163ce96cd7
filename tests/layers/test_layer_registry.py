"""The layer-type registry: first match wins, users can add types, unsupported modules get a clear error."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import lorakit
from core_helpers import NormNet, Scaler, ScalerNet
from lorakit.layers import LAYER_TYPES, Linear, register_layer_type


@pytest.fixture
def restore_registry():
    saved = list(LAYER_TYPES)
    yield
    LAYER_TYPES[:] = saved


class TaggedLinear(Linear):
    """A user's own Linear LoRA layer (e.g. with a fused kernel)."""


def test_custom_layer_type_is_used_for_its_modules(restore_registry):
    with pytest.raises(ValueError, match=r"'scaler' of type Scaler is not supported"):
        lorakit.get_peft_model(ScalerNet(), lorakit.LoraConfig(target_modules=["scaler"]))
    register_layer_type("scaler", lambda m, c: isinstance(m, Scaler), lambda m, c: Linear(m))
    torch.manual_seed(0)
    model = ScalerNet()
    x = torch.randn(5, 8)
    with torch.no_grad():
        base = model(x)
    model = lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules=["scaler"], r=2, init_lora_weights=False))
    layer = model.base_model.model.scaler
    assert isinstance(layer, Linear) and isinstance(layer.base_layer, Scaler)
    assert model.get_nb_trainable_parameters()[0] == 2 * (8 + 8)
    with torch.no_grad():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        expected = model.base_model.model.lin(
            2.0 * (x @ layer.base_layer.weight.T) + x @ a.T @ b.T * layer.scaling["default"]
        )
        torch.testing.assert_close(model(x), expected)
        assert not torch.allclose(model(x), base)


def test_first_match_wins_and_user_types_come_first(restore_registry):
    register_layer_type("tagged", lambda m, c: isinstance(m, nn.Linear), lambda m, c: TaggedLinear(m))
    assert LAYER_TYPES[0].name == "tagged"
    model = lorakit.get_peft_model(_mlp(), lorakit.LoraConfig(target_modules=["lin0", "head"]))
    assert type(model.base_model.model.lin0) is TaggedLinear and type(model.base_model.model.head) is TaggedLinear
    register_layer_type("only_head", lambda m, c: getattr(m, "out_features", None) == 4, lambda m, c: Linear(m))
    model = lorakit.get_peft_model(_mlp(), lorakit.LoraConfig(target_modules=["lin0", "head"]))
    assert type(model.base_model.model.lin0) is TaggedLinear and type(model.base_model.model.head) is Linear


def test_registry_sees_the_config(restore_registry):
    seen = []
    register_layer_type("spy", lambda m, c: seen.append(c.r) or False, lambda m, c: None)
    lorakit.get_peft_model(_mlp(), lorakit.LoraConfig(target_modules=["lin0"], r=3))
    assert 3 in seen


def test_unsupported_layer_type_names_module_type_and_supported_types():
    with pytest.raises(ValueError) as err:
        lorakit.get_peft_model(NormNet(), lorakit.LoraConfig(target_modules=["norm", "lin"]))
    message = str(err.value)
    assert "'norm' of type LayerNorm is not supported" in message
    for supported in ("torch.nn.Linear", "Embedding", "Conv1d/2d/3d", "transformers Conv1D", "register_layer_type"):
        assert supported in message
    assert not any(isinstance(m, lorakit.LoraLayer) for m in NormNet().modules())


def test_failed_injection_leaves_the_model_untouched():
    model = NormNet()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="LayerNorm"):
        lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules=r"lin|norm"))
    # the LoRA layer that was already created must not remain in the user's model
    assert {n: type(m) for n, m in model.named_modules()} == before
    with pytest.raises(ValueError, match="LayerNorm"):
        lorakit.inject_adapter_in_model(lorakit.LoraConfig(target_modules=r"lin|norm"), model)
    assert {n: type(m) for n, m in model.named_modules()} == before


def _mlp():
    from models import BUILDERS

    return BUILDERS["mlp"]()
