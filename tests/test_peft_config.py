"""PeftConfig, LoraConfig.from_json_file, get_peft_config and configs without peft_type, compared with peft."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch

import lorakit
from lorakit import LoraConfig, PeftConfig, get_peft_config
from models import MLP


def _save(tmp_path, data: dict):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    return tmp_path


def test_peft_config_from_pretrained_returns_lora_config_like_peft(tmp_path):
    peft.get_peft_model(MLP(), peft.LoraConfig(r=4, lora_alpha=12, target_modules=["lin0"])).save_pretrained(tmp_path)
    ours, theirs = PeftConfig.from_pretrained(tmp_path), peft.PeftConfig.from_pretrained(tmp_path)
    assert type(ours) is LoraConfig and type(theirs) is peft.LoraConfig
    assert isinstance(ours, PeftConfig)
    assert (ours.r, ours.lora_alpha, ours.target_modules) == (
        theirs.r,
        theirs.lora_alpha,
        sorted(theirs.target_modules),
    )
    assert ours.inference_mode is theirs.inference_mode is True


def test_from_json_file_returns_the_dict_like_peft(tmp_path):
    path = _save(tmp_path, {"peft_type": "LORA", "r": 3, "runtime_config": {"ephemeral_gpu_offload": True}})
    with pytest.warns(UserWarning, match="runtime_config"):
        ours = LoraConfig.from_json_file(path / "adapter_config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.LoraConfig.from_json_file(str(path / "adapter_config.json"))
    assert ours == theirs == {"peft_type": "LORA", "r": 3}


def test_get_peft_config_builds_the_named_class():
    data = {"peft_type": "LORA", "r": 5, "target_modules": ["lin0"], "lora_alpha": 10}
    ours, theirs = get_peft_config(dict(data)), peft.get_peft_config(dict(data))
    assert type(ours) is LoraConfig
    assert (ours.r, ours.lora_alpha, ours.target_modules) == (
        theirs.r,
        theirs.lora_alpha,
        sorted(theirs.target_modules),
    )
    with pytest.raises(ValueError, match="'IA3' is not supported by lorakit; supported: LORA"):
        get_peft_config({"peft_type": "IA3"})
    with pytest.raises(ValueError, match="has no 'peft_type'"):
        get_peft_config({"r": 4})


def test_adapter_config_without_peft_type_is_refused_like_peft(tmp_path):
    model = lorakit.get_peft_model(MLP(), LoraConfig(target_modules=["lin0"]))
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    del data["peft_type"]
    _save(tmp_path, data)
    with pytest.raises(KeyError):  # peft cannot load it either
        peft.PeftModel.from_pretrained(MLP(), tmp_path)
    with pytest.raises(ValueError, match=r"adapter_config.json has no 'peft_type'.*\"peft_type\": \"LORA\""):
        lorakit.PeftModel.from_pretrained(MLP(), tmp_path)
    with pytest.raises(ValueError, match="no 'peft_type'"):
        model.load_adapter(tmp_path, "other")
    assert list(model.peft_config) == ["default"]
    with pytest.raises(ValueError, match="no 'peft_type'"):
        PeftConfig.from_pretrained(tmp_path)


def test_peft_config_from_pretrained_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"No adapter_config\.json in .*empty"):
        PeftConfig.from_pretrained(tmp_path / "empty")
    _save(tmp_path / "other", {"peft_type": "IA3"})
    with pytest.raises(ValueError, match="'IA3' is not supported"):
        PeftConfig.from_pretrained(tmp_path / "other")


def test_lora_config_is_a_peft_config_and_loads_through_it(tmp_path):
    torch.manual_seed(0)
    model = lorakit.get_peft_model(MLP(), LoraConfig(r=2, target_modules=["lin1"]))
    model.save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(LoraConfig(), PeftConfig) and not isinstance(object(), PeftConfig)
    assert config.to_dict() == LoraConfig.from_pretrained(tmp_path).to_dict()


def test_public_mappings_name_the_same_classes_as_peft():
    assert lorakit.PEFT_TYPE_TO_CONFIG_MAPPING["LORA"] is LoraConfig
    assert peft.PEFT_TYPE_TO_CONFIG_MAPPING["LORA"] is peft.LoraConfig
    for task, cls in peft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING.items():
        assert lorakit.MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task].__name__ == cls.__name__
    for name in ("PeftConfig", "get_peft_config", "load_peft_weights", "AutoPeftModel", "AutoPeftModelForCausalLM"):
        assert name in lorakit.__all__ and name in peft.__all__
