"""exclude_modules entries that match no module exclude nothing: the user is told, as for target_modules."""

from __future__ import annotations

import warnings

import pytest

import lorakit
from models import BUILDERS


@pytest.mark.parametrize("exclude", [["lin9"], r"lin9|head2"])
def test_exclude_modules_matching_nothing_warns(exclude):
    config = lorakit.LoraConfig(target_modules=["lin0", "lin1"], exclude_modules=exclude)
    with pytest.warns(UserWarning, match=r"exclude_modules.*lin9"):
        model = lorakit.get_peft_model(BUILDERS["mlp"](), config)
    assert sorted(n for n, _ in model.base_model.lora_layers()) == ["lin0", "lin1"]


@pytest.mark.parametrize("exclude", [["lin1"], r".*lin1"])
def test_exclude_modules_that_exclude_something_do_not_warn(exclude):
    config = lorakit.LoraConfig(target_modules=["lin0", "lin1"], exclude_modules=exclude)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = lorakit.get_peft_model(BUILDERS["mlp"](), config)
    assert [n for n, _ in model.base_model.lora_layers()] == ["lin0"]
