"""ModulesToSaveWrapper called the way a parent calls the module: keyword-only arguments too, vs peft."""

from __future__ import annotations

import peft
import pytest
import torch
import torch.nn as nn

import lorakit


class KeywordHead(nn.Module):
    """Calls its head with keyword arguments only (``self.head(input=h)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(input=torch.relu(self.lin0(x)))


def _build() -> KeywordHead:
    torch.manual_seed(0)
    return KeywordHead().eval()


X = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))


def _pair():
    kwargs = dict(target_modules=["lin0"], modules_to_save=["head"], init_lora_weights=False)
    theirs = peft.get_peft_model(_build(), peft.LoraConfig(**kwargs)).eval()
    ours = lorakit.get_peft_model(_build(), lorakit.LoraConfig(**kwargs)).eval()
    for model in (theirs, ours):
        with torch.no_grad():
            model.base_model.model.head.modules_to_save["default"].weight.mul_(-2)
    lorakit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))  # same random factors
    return theirs, ours


def test_keyword_only_call_matches_peft():
    theirs, ours = _pair()
    with torch.no_grad():
        torch.testing.assert_close(ours(X), theirs(X), rtol=0, atol=1e-6)
        assert not torch.allclose(ours(X), _build()(X))
        with ours.disable_adapter(), theirs.disable_adapter():
            torch.testing.assert_close(ours(X), theirs(X), rtol=0, atol=1e-6)
            torch.testing.assert_close(ours(X), _build()(X), rtol=0, atol=1e-6)


def test_keyword_only_call_in_a_mixed_batch():
    _, ours = _pair()
    ours.add_adapter("other", lorakit.LoraConfig(target_modules=["lin0"], modules_to_save=["head"]))
    names = ["default", "__base__", "other", "default"]
    with torch.no_grad():
        mixed = ours(X, adapter_names=names)
        for row, name in enumerate(names):
            if name == "__base__":
                with ours.disable_adapter():
                    expected = ours(X[row : row + 1])
            else:
                ours.set_adapter(name)
                expected = ours(X[row : row + 1])
            torch.testing.assert_close(mixed[row : row + 1], expected, rtol=0, atol=1e-6)


def test_a_call_without_tensor_arguments_in_a_mixed_batch_is_refused():
    from lorakit.model.modules_to_save import ModulesToSaveWrapper
    from lorakit.routing import route_batch

    wrapper = ModulesToSaveWrapper(nn.Identity(), "default")
    wrapper.set_adapter("default")
    with route_batch(["default"]), pytest.raises(TypeError, match="no tensor argument to split by row"):
        wrapper()
