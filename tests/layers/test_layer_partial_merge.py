"""Several active adapters with only some merged: the unmerged ones still add their term (PEFT drops them)."""

import torch

import lorakit
from models import MLP


def test_active_adapters_not_merged_still_apply():
    torch.manual_seed(0)
    config = dict(target_modules=["lin0", "lin1"], r=2, init_lora_weights=False)
    model = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(**config)).eval()
    model.add_adapter("other", lorakit.LoraConfig(**config))
    model.set_adapter(["default", "other"])
    x = torch.randn(5, 10)
    with torch.no_grad():
        both = model(x)
        model.merge_adapter(["default"])
        torch.testing.assert_close(model(x), both, atol=1e-5, rtol=1e-5)
        model.merge_adapter(["other"])
        torch.testing.assert_close(model(x), both, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x), both, atol=1e-5, rtol=1e-5)
