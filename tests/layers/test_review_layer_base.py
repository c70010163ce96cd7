"""LoraLayer edge cases found in review: layer-level safe_merge on half-precision bases."""

from __future__ import annotations

import pytest
import torch

import lorakit
from models import BUILDERS


def _fp16_model_with_overflowing_delta() -> lorakit.PeftModel:
    config = lorakit.LoraConfig(target_modules=["lin0"], r=2, init_lora_weights=False)
    model = lorakit.get_peft_model(BUILDERS["mlp"]().half(), config)
    layer = model.base_model.model.lin0
    with torch.no_grad():  # delta = s * B @ A = 2 * 1e4 * 2 = 4e4 per element: finite in fp32, inf in fp16 (max 65504)
        layer.lora_B["default"].weight.fill_(1e4)
        layer.lora_A["default"].weight.fill_(1.0)
        layer.get_base_layer().weight.fill_(3e4)
    return model


def test_layer_safe_merge_rejects_overflow_in_base_dtype():
    layer = _fp16_model_with_overflowing_delta().base_model.model.lin0
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="default"):
        layer.merge(safe_merge=True)
    assert layer.merged_adapters == []
    torch.testing.assert_close(layer.weight.detach(), before, atol=0, rtol=0)


def test_model_safe_merge_rejects_overflow_in_base_dtype():
    model = _fp16_model_with_overflowing_delta()
    with pytest.raises(ValueError, match="default"):
        model.merge_adapter(safe_merge=True)
