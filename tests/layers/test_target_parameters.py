"""target_parameters (nn.Parameter targets, MoE experts): parity with peft (keys, shapes, outputs, checkpoints both
ways), no-op at init, merge/unmerge/merge_and_unload, several adapters, training and errors."""

from __future__ import annotations

import peft
import pytest
import torch
from moe_helpers import CASES, EXPERT_TARGETS, output, tiny_moe

import lorakit
from lorakit.layers import LoraLayer
from lorakit.layers.param_wrapper import ParamWrapper


def _config(lib, case: str, **kwargs):
    base = {"target_modules": [], **CASES[case][2], **kwargs}
    return lib.LoraConfig(**base)


def _pair(case: str, **kwargs):
    build = CASES[case][0]
    ref = peft.get_peft_model(build(), _config(peft, case, **kwargs))
    ours = lorakit.get_peft_model(build(), _config(lorakit, case, **kwargs))
    return ref.eval(), ours.eval()


def _inputs(case: str) -> torch.Tensor:
    torch.manual_seed(1)
    return CASES[case][1]()


@pytest.mark.parametrize("case", list(CASES))
def test_keys_shapes_and_outputs_match_peft(case):
    ref, ours = _pair(case, init_lora_weights=False)
    ref_sd, ours_sd = peft.get_peft_model_state_dict(ref), lorakit.get_peft_model_state_dict(ours)
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    lorakit.set_peft_model_state_dict(ours, ref_sd)
    x = _inputs(case)
    torch.testing.assert_close(output(ours, x), output(ref, x), atol=1e-5, rtol=1e-5)
    assert (output(ours, x) - output(CASES[case][0](), x)).abs().max() > 1e-3


def test_nesting_and_layout_of_the_expert_factors():
    _, ours = _pair("einsum", r=2)
    experts = ours.base_model.model.experts
    assert isinstance(experts, ParamWrapper) and experts.parameter_name == "down_proj"  # registered last: outermost
    assert experts.base_layer.parameter_name == "gate_up_proj"
    # gate_up_proj (E=3, 2*5, 6): A (r*E, in=6), B (out=10, r*E); down_proj (3, 6, 5): A (6, 5), B (6, 6)
    assert experts.base_layer.lora_A["default"].weight.shape == (6, 6)
    assert experts.base_layer.lora_B["default"].weight.shape == (10, 6)
    assert experts.lora_A["default"].weight.shape == (6, 5)
    # dW[e] = B_e A_e with A's rows grouped by expert and B's columns interleaved (column k*E + e)
    with torch.no_grad():
        for factor in (experts.lora_A["default"].weight, experts.lora_B["default"].weight):
            factor.normal_()
    a, b = experts.lora_A["default"].weight, experts.lora_B["default"].weight
    delta = experts.get_delta_weight("default")
    for e in range(3):
        expected = b[:, e::3] @ a[2 * e : 2 * e + 2] * experts.scaling["default"]
        torch.testing.assert_close(delta[e], expected)


@pytest.mark.parametrize("case", ["einsum", "einsum_transposed"])
def test_no_op_at_init(case):
    _, ours = _pair(case)
    x = _inputs(case)
    torch.testing.assert_close(output(ours, x), output(CASES[case][0](), x), atol=0, rtol=0)


@pytest.mark.parametrize("case", ["einsum_transposed", "qwen3_moe"])
def test_checkpoints_load_both_ways(tmp_path, case):
    build = CASES[case][0]
    ref, ours = _pair(case, init_lora_weights=False)
    lorakit.set_peft_model_state_dict(ours, {k: v * 2 for k, v in lorakit.get_peft_model_state_dict(ours).items()})
    ref.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    x = _inputs(case)
    into_ours = lorakit.PeftModel.from_pretrained(build(), tmp_path / "peft")
    torch.testing.assert_close(output(into_ours, x), output(ref, x), atol=1e-5, rtol=1e-5)
    into_peft = peft.PeftModel.from_pretrained(build(), tmp_path / "ours")
    torch.testing.assert_close(output(into_peft, x), output(ours, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["einsum", "einsum_transposed", "qwen3_moe"])
def test_merge_unmerge_and_merge_and_unload(case):
    build = CASES[case][0]
    _, ours = _pair(case, init_lora_weights=False)
    x = _inputs(case)
    expected = output(ours, x)
    params = {n: p.detach().clone() for n, p in build().named_parameters()}
    ours.base_model.merge_adapter()
    torch.testing.assert_close(output(ours, x), expected, atol=1e-5, rtol=1e-5)
    ours.base_model.unmerge_adapter()
    restored = {n: p for n, p in ours.unload().named_parameters()}
    for name, value in params.items():
        torch.testing.assert_close(restored[name], value, atol=1e-6, rtol=0)
    _, ours = _pair(case, init_lora_weights=False)
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert not any("base_layer" in name for name, _ in merged.named_modules(remove_duplicate=False))
    assert set(dict(merged.named_parameters())) == set(params)
    torch.testing.assert_close(output(merged, x), expected, atol=1e-5, rtol=1e-5)


def test_several_adapters_match_peft():
    ref, ours = _pair("einsum", init_lora_weights=False)
    for model, lib in ((ref, peft), (ours, lorakit)):
        model.add_adapter("other", _config(lib, "einsum", init_lora_weights=False, r=2))
    for name in ("default", "other"):
        lorakit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(ref, adapter_name=name), name)
    x = _inputs("einsum")
    for active in (["other"], ["default", "other"]):
        ref.base_model.set_adapter(active)
        ours.base_model.set_adapter(active)
        torch.testing.assert_close(output(ours, x), output(ref, x), atol=1e-5, rtol=1e-5)
    with ours.disable_adapter():
        torch.testing.assert_close(output(ours, x), output(tiny_moe(), x), atol=0, rtol=0)


def test_training_updates_only_the_factors():
    _, ours = _pair("einsum")
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    experts = ours.base_model.model.experts.get_base_layer()
    before = experts.gate_up_proj.detach().clone()
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    x = _inputs("einsum")
    for _ in range(2):
        opt.zero_grad()
        ours(x).pow(2).sum().backward()
        opt.step()
    assert isinstance(experts.gate_up_proj, torch.nn.Parameter)  # the Parameter is back after every forward
    torch.testing.assert_close(experts.gate_up_proj, before, atol=0, rtol=0)
    assert (output(ours, x) - output(tiny_moe(), x)).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lora_dropout=0.1), r"'experts\.gate_up_proj' cannot be adapted with lora_dropout=0\.1"),
        (dict(use_dora=True), r"cannot be adapted with the 'dora' variant"),
        (dict(lora_bias=True), r"cannot be adapted with lora_bias=True"),
        (dict(init_lora_weights="pissa"), r"init_lora_weights='pissa' \(3-D expert stacks take True, False or"),
        (dict(target_parameters=["experts.nope"]), r"target_parameters \['experts\.nope'\] match no parameter"),
        (dict(target_modules=["lin"], target_parameters=["lin.weight"]), r"'lin\.weight' belongs to 'lin', which"),
    ],
)
def test_errors_name_what_was_asked(kwargs, message):
    model = tiny_moe()
    config = lorakit.LoraConfig(**{"target_modules": [], "target_parameters": EXPERT_TARGETS, **kwargs})
    with pytest.raises(ValueError, match=message):
        lorakit.get_peft_model(model, config)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())  # left as it was


def test_adapters_must_target_the_same_parameters():
    _, ours = _pair("einsum")
    with pytest.raises(ValueError, match=r"must all target the same parameters"):
        ours.add_adapter("other", lorakit.LoraConfig(target_modules=[], target_parameters=["experts.down_proj"]))
    assert list(ours.peft_config) == ["default"]
    assert set(ours.base_model.model.experts.adapters) == {"default"}


def test_mixed_batches_are_refused():
    _, ours = _pair("einsum")
    with pytest.raises(ValueError, match=r"Mixed-adapter batches .* do not support target_parameters adapters"):
        ours(_inputs("einsum"), adapter_names=["default"] * 7)


def test_weighted_combination_is_refused():
    _, ours = _pair("einsum")
    with pytest.raises(ValueError, match=r"add_weighted_adapter does not support targeting nn.Parameter"):
        ours.base_model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="linear")
