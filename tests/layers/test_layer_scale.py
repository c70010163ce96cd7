"""Runtime scaling of a layer's adapter (PEFT's set_scale / scale_layer / unscale_layer / scaling[...] = v)."""

import pytest
import torch

import lorakit
from models import MLP


def _model():
    torch.manual_seed(0)
    return lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"], r=2, init_lora_weights=False))


def test_scale_helpers_change_the_lora_term_proportionally():
    model = _model()
    layer = model.base_model.model.lin0
    x = torch.randn(3, 10)
    base = layer.base_layer(x)
    term = layer(x) - base
    layer.scale_layer(3.0)
    torch.testing.assert_close(layer(x) - base, 3.0 * term, atol=1e-5, rtol=1e-5)
    layer.unscale_layer(3.0)
    torch.testing.assert_close(layer(x) - base, term, atol=1e-5, rtol=1e-5)
    layer.scaling["default"] = layer.scaling["default"] * 0.5
    torch.testing.assert_close(layer(x) - base, 0.5 * term, atol=1e-5, rtol=1e-5)
    layer.unscale_layer()
    torch.testing.assert_close(layer(x) - base, term, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("change", ["set_scale", "scale_layer", "unscale_layer", "assign"])
def test_rescaling_a_merged_adapter_is_refused_and_unmerge_stays_exact(change):
    model = _model()
    layer = model.base_model.model.lin0
    original = layer.base_layer.weight.detach().clone()
    model.merge_adapter()
    actions = {
        "set_scale": lambda: layer.set_scale("default", 2.0),
        "scale_layer": lambda: layer.scale_layer(2.0),
        "unscale_layer": lambda: layer.unscale_layer(2.0),
        "assign": lambda: layer.scaling.__setitem__("default", 5.0),
    }
    with pytest.raises(ValueError, match=r"merged.*unmerge it before changing its scale"):
        actions[change]()
    model.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, original, atol=1e-6, rtol=0)
