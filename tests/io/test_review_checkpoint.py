"""io.checkpoint edge cases found in review."""

from __future__ import annotations

import warnings

import pytest
import torch

import lorakit
from models import BUILDERS


def _saved(tmp_path) -> tuple[lorakit.PeftModel, str]:
    torch.manual_seed(0)
    config = lorakit.LoraConfig(target_modules=["lin0", "lin1"], r=2, init_lora_weights=False)
    model = lorakit.get_peft_model(BUILDERS["mlp"](), config)
    model.save_pretrained(tmp_path)
    return model, str(tmp_path)


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_adapter_named_like_a_tensor_suffix_loads_without_false_missing_keys(tmp_path, name):
    model, folder = _saved(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a "missing adapter keys" warning would fail here
        missing, unexpected = model.load_adapter(folder, name)
    assert missing == [] and unexpected == []
    layer = model.base_model.model.lin0
    torch.testing.assert_close(layer.lora_A[name].weight, layer.lora_A["default"].weight, atol=0, rtol=0)


def test_selected_adapters_as_a_string_is_a_clear_type_error(tmp_path):
    model, _ = _saved(tmp_path / "first")
    with pytest.raises(TypeError, match=r"selected_adapters.*\['default'\]"):
        model.save_pretrained(tmp_path / "second", selected_adapters="default")
    assert not (tmp_path / "second").exists()


def test_unusable_torch_device_is_not_reported_as_a_corrupt_file(tmp_path):
    _, folder = _saved(tmp_path)
    with pytest.raises(RuntimeError, match="nodevice") as info:
        lorakit.PeftModel.from_pretrained(BUILDERS["mlp"](), folder, torch_device="nodevice")
    assert "corrupt" not in str(info.value)
