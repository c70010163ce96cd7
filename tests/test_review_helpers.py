"""lorakit.helpers on models prepared for compiled hotswapping (scaling pinned in a 0-d tensor)."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.helpers import rescale_adapter_scale
from lorakit.utils.hotswap import prepare_model_for_compiled_hotswap
from models import BUILDERS


def test_rescale_adapter_scale_applies_to_pinned_scaling():
    torch.manual_seed(0)
    config = lorakit.LoraConfig(target_modules=["lin0", "lin1"], r=2, init_lora_weights=False)
    model = lorakit.get_peft_model(BUILDERS["mlp"](), config).eval()
    x = torch.randn(3, 10)
    with torch.no_grad():
        full = model(x)
        with model.disable_adapter():
            base = model(x)
        prepare_model_for_compiled_hotswap(model, target_rank=4)
        with rescale_adapter_scale(model, 0.0):
            torch.testing.assert_close(model(x), base, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), full, atol=1e-6, rtol=0)
        with pytest.raises(RuntimeError), rescale_adapter_scale(model, 0.0):
            raise RuntimeError("leave the block")
        torch.testing.assert_close(model(x), full, atol=1e-6, rtol=0)
