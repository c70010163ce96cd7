"""Re-adding an adapter name on a layer replaces it whole: no stale DoRA magnitude or factors remain."""

import pytest
import torch

import lorakit
from models import MLP


def test_replacing_a_dora_adapter_with_plain_lora_leaves_no_magnitude():
    torch.manual_seed(0)
    model = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"], r=2, use_dora=True))
    layer = model.base_model.model.lin0
    assert "default" in layer.lora_magnitude_vector
    layer.update_layer("default", 4, 4, lorakit.LoraConfig(target_modules=["lin0"], r=4))
    assert "default" not in layer.lora_magnitude_vector
    assert layer.lora_A["default"].weight.shape == (4, 10)
    assert not any("lora_magnitude_vector" in k for k in model.state_dict())


def test_replacing_a_merged_adapter_is_refused():
    model = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"], r=2, init_lora_weights=False))
    layer = model.base_model.model.lin0
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged into this layer; unmerge it before replacing it"):
        layer.update_layer("default", 4, 4, lorakit.LoraConfig(target_modules=["lin0"], r=4))
    assert layer.lora_A["default"].weight.shape == (2, 10)
