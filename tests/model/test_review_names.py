"""Reserved and malformed names and ranks are refused with messages that say why."""

import pytest

import lorakit
from models import MLP


def test_base_adapter_name_is_reserved():
    model = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"], r=2))
    with pytest.raises(ValueError, match="'__base__' is reserved for base-model rows"):
        model.add_adapter("__base__", lorakit.LoraConfig(target_modules=["lin0"], r=2))
    assert list(model.peft_config) == ["default"]


def test_boolean_ranks_are_refused():
    with pytest.raises(ValueError, match=r"rank_pattern\['lin0'\] must be a positive integer, got True"):
        lorakit.LoraConfig(target_modules=["lin0"], rank_pattern={"lin0": True})
    layer = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"], r=2)).base_model.model.lin0
    with pytest.raises(ValueError, match="`r` must be a positive integer, got True"):
        layer.update_layer("other", True, 2, lorakit.LoraConfig(target_modules=["lin0"]))
    assert list(layer.adapters) == ["default"]
