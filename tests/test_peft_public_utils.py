"""PEFT's remaining top-level names: the error/warning classes, base-model state dicts, mixed-precision casting and
``shift_tokens_right``, each against peft on the same input."""

from __future__ import annotations

import peft
import pytest
import torch

import lorakit
from models import MLP, tiny_llama


def test_error_and_warning_classes_match_peft_hierarchy():
    assert issubclass(lorakit.NoMatchingPeftModuleError, lorakit.PeftError)
    assert issubclass(lorakit.NoMatchingPeftModuleError, ValueError)  # `except ValueError` keeps working
    assert issubclass(lorakit.PeftWarning, UserWarning)
    for name in ("NoMatchingPeftModuleError", "PeftError", "PeftWarning"):
        ours, theirs = getattr(lorakit, name), getattr(peft, name)
        assert [c.__name__ for c in ours.__mro__] == [c.__name__ for c in theirs.__mro__]
        assert name in lorakit.__all__


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_modules": ["nope"]},
        {"target_modules": ["lin0"], "exclude_modules": ["lin0"]},
        {"target_modules": ["q_proj"], "layers_to_transform": [7]},
    ],
)
def test_targets_matching_nothing_raise_no_matching_error_in_both(kwargs):
    base = tiny_llama if "layers_to_transform" in kwargs else MLP
    for lib in (peft, lorakit):
        with pytest.raises(lib.NoMatchingPeftModuleError):
            lib.get_peft_model(base(), lib.LoraConfig(**kwargs))
    with pytest.raises(ValueError):  # still a ValueError
        lorakit.get_peft_model(base(), lorakit.LoraConfig(**kwargs))


def test_target_parameters_matching_nothing_raise_no_matching_error():
    for lib in (peft, lorakit):
        with pytest.raises(lib.NoMatchingPeftModuleError):
            lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=[], target_parameters=["nope.weight"]))


def _both(build):
    return build(peft), build(lorakit)


def test_get_and_set_base_model_state_dict_equal_peft():
    def build(lib):
        torch.manual_seed(0)
        config = lib.LoraConfig(
            target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], trainable_token_indices=[1, 5]
        )
        model = lib.get_peft_model(tiny_llama(), config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_()
        return model

    ref, ours = _both(build)
    expected = tiny_llama().state_dict()
    got_ref, got_ours = peft.get_base_model_state_dict(ref), lorakit.get_base_model_state_dict(ours)
    assert set(got_ours) == set(got_ref) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got_ours[key], value) and torch.equal(got_ref[key], value), key

    new = {k: v + 1.0 for k, v in expected.items()}
    for lib, model in ((peft, ref), (lorakit, ours)):
        result = lib.set_base_model_state_dict(model, new)
        assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    for key in new:
        assert torch.equal(lorakit.get_base_model_state_dict(ours)[key], peft.get_base_model_state_dict(ref)[key])
    # the adapters are untouched
    lora = {k: v for k, v in ours.state_dict().items() if "lora_" in k}
    assert lora and all(torch.equal(v, ours.state_dict()[k]) for k, v in lora.items())

    bad = dict(new, extra=torch.zeros(1))
    bad.pop("lm_head.weight")
    for lib, model in ((peft, ref), (lorakit, ours)):
        with pytest.raises(RuntimeError, match="Missing key"):
            lib.set_base_model_state_dict(model, bad)
        result = lib.set_base_model_state_dict(model, bad, strict=False)
        assert list(result.missing_keys) == ["lm_head.weight"] and list(result.unexpected_keys) == ["extra"]


def test_cast_mixed_precision_params_equal_peft():
    ref, ours = _both(lambda lib: lib.get_peft_model(MLP(), lib.LoraConfig(target_modules=["lin0", "lin1"])))
    peft.cast_mixed_precision_params(ref, torch.bfloat16)
    lorakit.cast_mixed_precision_params(ours, torch.bfloat16)
    dtypes_ref = {n: p.dtype for n, p in ref.named_parameters()}
    dtypes_ours = {n: p.dtype for n, p in ours.named_parameters()}
    assert dtypes_ours == dtypes_ref
    assert {d for n, d in dtypes_ours.items() if "lora_" in n} == {torch.float32}
    assert torch.bfloat16 in dtypes_ours.values()


def test_shift_tokens_right_equal_peft():
    ids = torch.tensor([[5, 6, -100, 7], [-100, 1, 2, 3]])
    before = ids.clone()
    ours = lorakit.shift_tokens_right(ids, pad_token_id=0, decoder_start_token_id=9)
    assert torch.equal(ours, peft.shift_tokens_right(ids, pad_token_id=0, decoder_start_token_id=9))
    assert torch.equal(ids, before)
    for lib in (peft, lorakit):
        with pytest.raises(ValueError, match="pad_token_id"):
            lib.shift_tokens_right(ids, pad_token_id=None, decoder_start_token_id=9)
