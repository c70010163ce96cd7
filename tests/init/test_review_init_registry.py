"""init.registry: a method registered by pattern keeps its supported layer kinds."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.init import registry
from models import BUILDERS


@pytest.fixture
def linear_only_pattern(monkeypatch):
    """Register ``review_*`` (linear layers only) on copies of the registry tables, restored afterwards."""
    monkeypatch.setattr(registry, "_PREFIX_REGISTRY", list(registry._PREFIX_REGISTRY))
    monkeypatch.setattr(registry, "LAYER_KINDS", dict(registry.LAYER_KINDS))

    @registry.register_init("review", pattern=r"review_\d+", layer_kinds={"linear"})
    def _zero_b(request: registry.InitRequest) -> registry.InitResult:
        return registry.InitResult(lora_a=torch.ones(request.a_shape), lora_b=torch.zeros(request.b_shape))


def test_pattern_method_layer_kinds_are_enforced(linear_only_pattern):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 4))
    config = lorakit.LoraConfig(target_modules=["0"], r=2, init_lora_weights="review_3")
    with pytest.raises(ValueError, match=r"review_3.*'0'.*embedding.*linear"):
        lorakit.get_peft_model(model, config)


def test_pattern_method_runs_on_supported_kind(linear_only_pattern):
    config = lorakit.LoraConfig(target_modules=["lin0"], r=2, init_lora_weights="review_3")
    model = lorakit.get_peft_model(BUILDERS["mlp"](), config)
    torch.testing.assert_close(model.base_model.model.lin0.lora_A["default"].weight, torch.ones(2, 10))
