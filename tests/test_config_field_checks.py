"""LoraConfig refuses ill-typed or out-of-range fields with one clear error (issue 14, items 7 and 8 and "Clear
errors"), where PEFT takes them and misbehaves later. Each case also shows what PEFT does with the same value."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch

import lorakit
from models import MLP

REFUSED = [
    (dict(lora_alpha=float("nan")), r"`lora_alpha` must be a finite number, got nan"),
    (dict(lora_alpha=float("inf")), r"`lora_alpha` must be a finite number, got inf"),
    (dict(lora_alpha=-float("inf")), r"`lora_alpha` must be a finite number, got -inf"),
    (dict(lora_alpha="16"), r"`lora_alpha` must be a finite number \(a number, not a string\), got '16' \(str\)"),
    (dict(lora_alpha=None), r"`lora_alpha` must be a finite number, got None \(NoneType\)"),
    (dict(lora_alpha=True), r"`lora_alpha` must be a finite number, got True \(bool\)"),
    (dict(lora_dropout=None), r"`lora_dropout` must be in \[0, 1\), got None \(NoneType\); give a number"),
    (dict(lora_dropout=float("nan")), r"`lora_dropout` must be in \[0, 1\), got nan"),
    (dict(use_rslora="no"), r"`use_rslora` must be True or False, got 'no' \(str\)"),
    (dict(use_dora="yes"), r"`use_dora` must be True or False, got 'yes' \(str\)"),
    (dict(fan_in_fan_out=1), r"`fan_in_fan_out` must be True or False, got 1 \(int\)"),
    (dict(inference_mode="False"), r"`inference_mode` must be True or False, got 'False'"),
    (dict(lora_bias=None), r"`lora_bias` must be True or False, got None"),
    (dict(target_modules=123), r"`target_modules` must be a list of strings or a regex string, got 123 \(int\)"),
    (dict(target_modules={"lin0": 1}), r"got \{'lin0': 1\} \(dict\).*list\(your_dict\)"),
    (dict(exclude_modules=[1]), r"`exclude_modules` must be a list of strings or a regex string, got \[1\]"),
    (dict(modules_to_save=5), r"`modules_to_save` must be a list of module names or None; got 5 \(int\)"),
    (dict(target_modules=["a"], layers_to_transform="0"), r"`layers_to_transform` must be a non-negative layer"),
    (dict(target_modules=["a"], layers_to_transform=[0, -1]), r"non-negative layer index .*got \[0, -1\]"),
    (dict(target_modules=["a"], layers_to_transform=True), r"`layers_to_transform` must be .*got True \(bool\)"),
    (dict(target_modules=["a"], layers_to_transform=[0.5]), r"`layers_to_transform` must be .*got \[0.5\]"),
    (dict(rank_pattern={"(": 4}), r"`rank_pattern` key '\(' is not a valid regular expression"),
    (dict(alpha_pattern={"lin[0": 4}), r"`alpha_pattern` key 'lin\[0' is not a valid regular expression"),
    (dict(alpha_pattern={"lin0": float("nan")}), r"alpha_pattern\['lin0'\] must be a finite number, got nan"),
    (dict(alpha_pattern={"lin0": "8"}), r"alpha_pattern\['lin0'\] must be a finite number \(a number, not a string"),
    (dict(rank_pattern={"lin0": 2.0}), r"rank_pattern\['lin0'\] must be a positive integer, got 2.0 \(float\)"),
    (dict(rank_pattern=["lin0"]), r"`rank_pattern` must be a dict of regex -> value, got \['lin0'\] \(list\)"),
    (dict(rank_pattern={3: 4}), r"`rank_pattern` keys must be strings \(regular expressions\), got 3 \(int\)"),
]


@pytest.mark.parametrize(("kwargs", "message"), REFUSED)
def test_bad_field_is_refused_with_a_message_naming_it(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lorakit.LoraConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), REFUSED[:2])
def test_non_finite_alpha_is_refused_when_read_from_a_file(tmp_path, kwargs, message):
    """JSON written by other tools may hold NaN (Python's json writes it): the loader refuses it too."""
    data = lorakit.LoraConfig(target_modules=["lin0"]).to_dict() | kwargs
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        lorakit.LoraConfig.from_pretrained(tmp_path)


def test_what_peft_does_with_a_string_flag_and_a_nan_alpha():
    """Why lorakit refuses: peft turns rsLoRA on for use_rslora='no', and a NaN alpha makes every output NaN."""
    torch.manual_seed(0)
    model = peft.get_peft_model(MLP(), peft.LoraConfig(target_modules=["lin0"], use_rslora="no", lora_alpha=4, r=4))
    assert model.base_model.model.lin0.scaling["default"] == 4 / 4**0.5  # rsLoRA scaling: the string was truthy
    model = peft.get_peft_model(
        MLP(), peft.LoraConfig(target_modules=["lin0"], lora_alpha=float("nan"), init_lora_weights=False)
    )
    assert torch.isnan(model(torch.randn(2, 10))).all()


def test_zero_alpha_warns_and_is_kept():
    with pytest.warns(UserWarning, match="`lora_alpha` is 0: scaling is 0, so this adapter changes nothing"):
        config = lorakit.LoraConfig(lora_alpha=0)
    assert config.lora_alpha == 0
    with pytest.warns(UserWarning, match=r"alpha_pattern\['lin0'\] is 0"):
        lorakit.LoraConfig(alpha_pattern={"lin0": 0})


def test_valid_values_pass_and_are_normalised():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = lorakit.LoraConfig(
            lora_alpha=16.5,
            lora_dropout=0,
            use_rslora=True,
            target_modules=("lin1", "lin0"),
            layers_to_transform=(0, 1),
            layers_pattern="layers",
            rank_pattern={r"lin\d": 2},
            alpha_pattern={"lin0": -4},
        )
    assert config.target_modules == ["lin1", "lin0"]  # order kept for tuples; sets are sorted
    assert config.layers_to_transform == [0, 1]
    assert lorakit.LoraConfig(target_modules={"b", "a"}).target_modules == ["a", "b"]
    assert lorakit.LoraConfig(target_modules=["a"], layers_to_transform=3).layers_to_transform == 3


def test_a_bare_string_in_modules_to_save_is_one_name_not_its_letters():
    """PEFT iterates the string: every module whose name ends with 'l', 'i', 'n', '1' ... would be saved in full."""
    assert lorakit.LoraConfig(modules_to_save="lin1").modules_to_save == ["lin1"]
    model = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"], modules_to_save="lin1"))
    wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"]
    assert wrapped == ["base_model.model.lin1"]
    saved = json.loads(json.dumps(model.peft_config["default"].to_dict()))
    assert saved["modules_to_save"] == ["lin1"]  # written as a list: peft reads it back correctly


def test_numpy_scalars_are_taken_as_python_numbers():
    np = pytest.importorskip("numpy")
    config = lorakit.LoraConfig(
        r=np.int64(4),
        lora_alpha=np.float32(8),
        lora_dropout=np.float64(0.1),
        target_modules=["lin0"],
        layers_to_transform=[np.int64(0)],
        rank_pattern={"lin0": np.int32(2)},
    )
    assert (type(config.r), type(config.lora_alpha), type(config.lora_dropout)) == (int, float, float)
    assert type(config.layers_to_transform[0]) is int and type(config.rank_pattern["lin0"]) is int
    assert json.loads(config.to_json_string())["lora_alpha"] == 8.0  # JSON-ready
    with pytest.raises(ValueError, match=r"`lora_alpha` must be a finite number, got .*nan"):
        lorakit.LoraConfig(lora_alpha=np.float32("nan"))
