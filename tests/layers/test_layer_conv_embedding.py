"""Conv and Embedding LoRA layers: factor shapes in PEFT's layout, the delta against a direct computation, and
merged == unmerged for kernels with stride, dilation and non-zero padding modes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lorakit


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, padding=2, dilation=2, padding_mode="reflect")
        self.c3 = nn.Conv3d(3, 4, (1, 2, 2), stride=(1, 2, 2), padding_mode="circular")
        self.g = nn.Conv2d(4, 8, 3, padding=1, groups=4)


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "c1": torch.randn(2, 3, 11, generator=g),
        "c2": torch.randn(2, 3, 9, 9, generator=g),
        "c3": torch.randn(2, 3, 2, 6, 6, generator=g),
        "g": torch.randn(2, 4, 5, 5, generator=g),
    }


def _model(r: int = 4):
    torch.manual_seed(0)
    config = lorakit.LoraConfig(target_modules=["c1", "c2", "c3", "g"], r=r, lora_alpha=6, init_lora_weights=False)
    return lorakit.get_peft_model(Convs(), config).base_model.model


def test_factor_shapes_follow_peft_layout():
    m = _model()
    assert m.c1.lora_A["default"].weight.shape == (4, 3, 3)
    assert m.c1.lora_B["default"].weight.shape == (6, 4, 1)
    assert m.c2.lora_A["default"].weight.shape == (4, 3, 3, 3)
    assert m.c3.lora_B["default"].weight.shape == (4, 4, 1, 1, 1)
    assert m.g.lora_B["default"].weight.shape == (8, 1, 1, 1)  # r / groups input channels per group
    assert m.g.lora_B["default"].groups == 4


@pytest.mark.parametrize("name", ["c1", "c2", "c3", "g"])
def test_lora_term_equals_a_direct_computation(name):
    layer = getattr(_model(), name)
    x = _inputs()[name]
    base = layer.get_base_layer()
    a, b = layer.lora_A["default"], layer.lora_B["default"]
    with torch.no_grad():
        expected = base(x) + b(a(x)) * 1.5
        torch.testing.assert_close(layer(x), expected)
        assert not torch.allclose(layer(x), base(x))


@pytest.mark.parametrize("name", ["c1", "c2", "c3"])
def test_merged_output_equals_unmerged_with_stride_dilation_and_padding_modes(name):
    layer = getattr(_model(), name)
    x = _inputs()[name]
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
        layer.unmerge()
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)


def test_grouped_conv_refuses_to_merge():
    with pytest.raises(ValueError, match=r"grouped conv \(groups=4\)"):
        _model().g.merge()


def test_embedding_lora_term_and_padding_idx():
    torch.manual_seed(0)
    emb = nn.Embedding(20, 6, padding_idx=0)
    model = nn.Sequential(emb)
    config = lorakit.LoraConfig(target_modules=["0"], r=3, lora_alpha=3, init_lora_weights=False)
    layer = lorakit.get_peft_model(model, config).base_model.model[0]
    a, b = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    assert a.shape == (3, 20) and b.shape == (6, 3)
    ids = torch.tensor([[0, 3, 19], [5, 5, 0]])
    with torch.no_grad():
        expected = F.embedding(ids, emb.weight) + F.embedding(ids, a.T) @ b.T
        torch.testing.assert_close(layer(ids), expected)
        delta = layer.get_delta_weight("default")
        assert delta.shape == (20, 6)
        torch.testing.assert_close(delta, (b @ a).T)
