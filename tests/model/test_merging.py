"""Merging: merged, unmerged and merge_and_unload agree with each other and with peft; float32 math cast back;
idempotent; safe_merge; unmerge restores; nothing of LoRA remains after merge_and_unload / unload."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch

import lorakit
from lorakit.model.modules_to_save import ModulesToSaveWrapper
from models import BUILDERS, make_inputs, output_tensor

CASES = {
    "llama": ("llama", dict(target_modules="all-linear", r=4, lora_alpha=8)),
    "llama_emb_rslora": ("llama", dict(target_modules=["embed_tokens", "q_proj", "lm_head"], r=4, use_rslora=True)),
    "gpt2_conv1d": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], r=4)),
    "bert_mts": ("bert", dict(task_type="SEQ_CLS", target_modules=["query", "value"], r=4)),
    "conv": ("conv", dict(target_modules=["conv1d", "conv2d"], r=2)),
    # peft's merge breaks on a 1x1x1 Conv3d (it takes the 2-D 1x1 path); lorakit's delta is one reshape for all
    "conv3d": ("conv", dict(target_modules=["conv3d"], r=2)),
    "emb": ("emb", dict(target_modules=["emb", "lin"], r=3)),
    "mlp_lora_bias": ("mlp", dict(target_modules=["lin0", "head"], r=3, lora_bias=True)),
    "mlp_patterns": (
        "mlp",
        dict(target_modules=["lin0", "lin1"], r=3, rank_pattern={"lin1": 5}, alpha_pattern={"lin0": 7}),
    ),
}


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.1)


def _pair(case):
    """(lorakit model, peft model) with identical weights, eval mode."""
    kind, kwargs = CASES[case]
    ours = lorakit.get_peft_model(BUILDERS[kind](), lorakit.LoraConfig(init_lora_weights=False, **kwargs))
    _perturb(ours)
    ref = peft.get_peft_model(BUILDERS[kind](), peft.LoraConfig(init_lora_weights=False, **kwargs))
    ref.load_state_dict(ours.state_dict())
    return ours.eval(), ref.eval(), kind


def _out(model, kind):
    with torch.no_grad():
        return output_tensor(model(**make_inputs(kind)))


def _lora_free(model):
    return not any(isinstance(m, (lorakit.LoraLayer, ModulesToSaveWrapper)) for m in model.modules())


@pytest.mark.parametrize("case", list(CASES))
def test_merged_unmerged_and_merge_and_unload_agree_with_each_other_and_peft(case):
    ours, ref, kind = _pair(case)
    base_keys = set(BUILDERS[kind]().state_dict())
    unmerged = _out(ours, kind)
    torch.testing.assert_close(unmerged, _out(ref, kind), atol=1e-5, rtol=0)
    before = {k: v.clone() for k, v in ours.state_dict().items()}

    ours.merge_adapter()
    torch.testing.assert_close(_out(ours, kind), unmerged, atol=1e-4, rtol=1e-4)
    ours.unmerge_adapter()
    for key, value in ours.state_dict().items():  # float32 rounding of W + dW - dW, |dW| up to ~30 here
        torch.testing.assert_close(value, before[key], atol=1e-5, rtol=0, msg=key)
    torch.testing.assert_close(_out(ours, kind), unmerged, atol=1e-5, rtol=0)

    merged_model = ours.merge_and_unload()
    assert _lora_free(merged_model)
    assert set(merged_model.state_dict()) == base_keys
    torch.testing.assert_close(_out(merged_model, kind), unmerged, atol=1e-4, rtol=1e-4)
    if case == "conv3d":
        return
    ref_merged = ref.merge_and_unload()
    for key, value in ref_merged.state_dict().items():
        torch.testing.assert_close(merged_model.state_dict()[key], value, atol=1e-5, rtol=1e-6, msg=key)


@pytest.mark.parametrize("case", ["llama", "bert_mts"])
def test_unload_gives_back_the_base_model(case):
    kind = CASES[case][0]
    base = BUILDERS[kind]()
    expected = _out(base, kind)
    ours = lorakit.get_peft_model(base, lorakit.LoraConfig(init_lora_weights=False, **CASES[case][1]))
    _perturb(ours)
    assert not torch.allclose(_out(ours.eval(), kind), expected, atol=1e-3)
    unloaded = ours.unload()
    assert unloaded is base and ours.get_base_model() is base
    assert _lora_free(unloaded)
    assert set(unloaded.state_dict()) == set(BUILDERS[kind]().state_dict())
    torch.testing.assert_close(_out(unloaded, kind), expected, atol=0, rtol=0)


def test_bf16_merge_is_float32_math_cast_back_and_matches_peft():
    ours, ref, _ = _pair("llama")
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.bfloat16
    original = layer.base_layer.weight.detach().clone()
    delta = layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float() * 2.0
    ours.merge_adapter()
    ref.merge_adapter()
    merged = layer.base_layer.weight.detach()
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, (original.float() + delta).to(torch.bfloat16))
    # peft rounds the delta to bf16 before adding (two roundings); lorakit rounds once, so it is never further
    # from the exact sum than peft
    exact = original.float() + delta
    ref_merged = ref.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.float()
    assert ((merged.float() - exact).abs() <= (ref_merged - exact).abs()).all()
    assert not torch.equal(merged.float(), ref_merged)
    ours.unmerge_adapter()
    restored = layer.base_layer.weight.detach()
    # one bf16 rounding on merge and one on unmerge: within 2 ulps of the larger magnitude
    ulp = (merged.float().abs().maximum(original.float().abs()) * 2.0**-7).clamp_min(2.0**-133)
    assert ((restored.float() - original.float()).abs() <= 2 * ulp).all()


def test_merging_twice_warns_and_changes_nothing():
    ours, _, _ = _pair("mlp_lora_bias")
    ours.merge_adapter()
    after_first = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.warns(UserWarning, match="already merged"):
        ours.merge_adapter()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, after_first[key]), key
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.unmerge_adapter()
    with pytest.warns(UserWarning, match="Already unmerged"):
        ours.base_model.model.lin0.unmerge()


def test_safe_merge_names_the_broken_adapter_and_changes_nothing():
    ours, _, _ = _pair("llama")
    ours.add_adapter("broken", lorakit.LoraConfig(target_modules=["v_proj", "o_proj"], r=2, init_lora_weights=False))
    with torch.no_grad():
        ours.base_model.model.model.layers[1].self_attn.o_proj.lora_B["broken"].weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"adapter broken seems to be broken \(layer model\.layers\.1\.self_attn\.o_proj\)"
    ):
        ours.merge_adapter(["default", "broken"], safe_merge=True)
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0, equal_nan=True, msg=key)
    assert not any(layer.merged for _, layer in ours.base_model.lora_layers())
    with pytest.raises(ValueError, match="broken"):
        ours.merge_and_unload(safe_merge=True, adapter_names=["broken"])
    assert not _lora_free(ours.get_base_model())  # nothing was unloaded either
    # safe_merge on a healthy adapter gives the same weights as a plain merge
    ours.merge_adapter(["default"], safe_merge=True)
    safe = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.unmerge_adapter()
    ours.merge_adapter(["default"])
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, safe[key], atol=0, rtol=0, equal_nan=True, msg=key)


def test_several_adapters_merge_in_order_and_unmerge_lifo_like_peft():
    ours, ref, kind = _pair("llama")
    for lib, model in ((lorakit, ours), (peft, ref)):
        model.add_adapter("other", lib.LoraConfig(target_modules=["q_proj", "k_proj"], r=2, init_lora_weights=False))
    _perturb(ours, seed=3)
    ref.load_state_dict(ours.state_dict())
    ours.base_model.set_adapter(["default", "other"])
    ref.base_model.set_adapter(["default", "other"])
    both = _out(ours, kind)
    torch.testing.assert_close(both, _out(ref, kind), atol=1e-5, rtol=0)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.merge_adapter()
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.merged_adapters == ["default", "other"]
    torch.testing.assert_close(_out(ours, kind), both, atol=1e-4, rtol=1e-4)
    ours.unmerge_adapter()
    assert layer.merged_adapters == []
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0, msg=key)

    merged = ours.merge_and_unload(adapter_names=["other"])
    ref_merged = ref.merge_and_unload(adapter_names=["other"])
    torch.testing.assert_close(_out(merged, kind), _out(ref_merged, kind), atol=1e-5, rtol=0)


def test_merge_and_unload_keeps_the_merged_adapters_head():
    ours, ref, kind = _pair("bert_mts")
    merged = ours.merge_and_unload(progressbar=True)
    torch.testing.assert_close(_out(merged, kind), _out(ref.merge_and_unload(), kind), atol=1e-5, rtol=0)
    assert isinstance(merged.classifier, torch.nn.Linear)


def test_errors_name_the_problem():
    ours, _, _ = _pair("conv")
    with pytest.raises(ValueError, match=r"Adapter\(s\) \['nope'\] not found; existing adapters: \['default'\]"):
        ours.merge_adapter(["nope"])
    with pytest.raises(TypeError, match=r"list of strings.*\['default'\]"):
        ours.merge_adapter("default")
    ours.merge_adapter()
    with pytest.raises(ValueError, match=r"'default' is merged.*unmerge"):
        ours.delete_adapter("default")
    grouped = lorakit.get_peft_model(BUILDERS["conv"](), lorakit.LoraConfig(target_modules=["grouped"], r=2))
    with pytest.raises(ValueError, match=r"grouped conv \(groups=2\)"):
        grouped.merge_adapter()
    assert not any(layer.merged for _, layer in grouped.base_model.lora_layers())
