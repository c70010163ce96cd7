"""LoraModel edge cases found in review."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.model.lora_model import LoraModel
from models import BUILDERS


def test_dict_config_without_the_active_adapter_is_refused():
    configs = {"a": lorakit.LoraConfig(target_modules=["lin0"]), "b": lorakit.LoraConfig(target_modules=["lin1"])}
    model = BUILDERS["mlp"]()
    with pytest.raises(ValueError, match=r"'default'.*\['a', 'b'\]"):
        LoraModel(model, configs)
    assert not any("lora_" in name for name, _ in model.named_modules())


def test_dict_config_activates_the_named_adapter():
    configs = {"a": lorakit.LoraConfig(target_modules=["lin0"]), "b": lorakit.LoraConfig(target_modules=["lin1"])}
    model = LoraModel(BUILDERS["mlp"](), configs, adapter_name="b")
    assert model.active_adapters == ["b"]
    assert sorted(model.peft_config) == ["a", "b"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.lin1.lora_A.b.weight", "model.lin1.lora_B.b.weight"}
    assert isinstance(model(torch.randn(2, 10)), torch.Tensor)


def test_set_adapter_refuses_duplicate_names():
    config = lorakit.LoraConfig(target_modules=["lin0"], init_lora_weights=False)
    model = lorakit.get_peft_model(BUILDERS["mlp"](), config)
    with pytest.raises(ValueError, match=r"\['default', 'default'\].*twice"):
        model.set_adapter(["default", "default"])  # the adapter's term would be added twice
    assert model.active_adapters == ["default"]
