"""MoE models of transformers 5 (experts fused into 3-D parameters, router ``gate``): 'all-linear', lists and regexes
give the same adapter as peft 0.21 (names, keys, shapes, values, outputs, files both ways), except the two documented
differences: dense gate/up/down_proj MLPs stay targeted, and target_modules=None keeps lorakit's defaults."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers

import lorakit
from lorakit.layers import LoraLayer
from lorakit.targeting import MODEL_TYPE_FAMILIES

TINY = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=32,
)
MOE = dict(
    moe_intermediate_size=8,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    q_lora_rank=8,
    kv_lora_rank=8,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=8,
)


def tiny(model_type: str, seed: int = 0) -> torch.nn.Module:
    config = transformers.AutoConfig.for_model(model_type, **TINY)
    for key, value in MOE.items():
        if hasattr(config, key):
            setattr(config, key, value)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _pair(model_type: str, **kwargs):
    ref = peft.get_peft_model(tiny(model_type), peft.LoraConfig(**kwargs))
    ours = lorakit.get_peft_model(tiny(model_type), lorakit.LoraConfig(**kwargs))
    return ref, ours


def _shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def _lora_paths(model: torch.nn.Module, layer_type: type) -> set[str]:
    return {n.replace("base_model.model.", "") for n, m in model.named_modules() if isinstance(m, layer_type)}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.arange(12).reshape(2, 6) % 64

SAME_AS_PEFT = [
    ("mixtral", "all-linear"),
    ("qwen3_moe", "all-linear"),
    ("olmoe", "all-linear"),
    ("qwen3_moe", ["q_proj", "gate_proj", "up_proj", "down_proj", "gate"]),
    ("mixtral", ["v_proj", "w1", "w3", "w2"]),
    ("qwen3_moe", r".*\.(q_proj|gate_proj|up_proj|down_proj)"),
    ("mixtral", r".*\.(v_proj|gate)"),
    ("qwen3_moe", r".*\.experts\.down_proj|.*\.k_proj"),
]


@pytest.mark.parametrize(("model_type", "targets"), SAME_AS_PEFT, ids=lambda v: str(v)[:40])
def test_same_adapter_as_peft(model_type, targets):
    ref, ours = _pair(model_type, target_modules=targets, init_lora_weights=False)
    ref_sd, ours_sd = peft.get_peft_model_state_dict(ref), lorakit.get_peft_model_state_dict(ours)
    assert _shapes(ours_sd) == _shapes(ref_sd)
    assert any(".mlp." in k for k in ours_sd)  # experts or router
    assert _lora_paths(ours, LoraLayer) == _lora_paths(ref, peft.tuners.lora.LoraLayer)
    assert ours.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    ours_cfg, ref_cfg = ours.peft_config["default"], ref.peft_config["default"]
    if not isinstance(targets, str) or targets == "all-linear":  # a regex's parameters are written as full paths
        assert sorted(ours_cfg.target_parameters) == sorted(ref_cfg.target_parameters)
    assert (ours_cfg.rank_pattern, ours_cfg.alpha_pattern) == (ref_cfg.rank_pattern, ref_cfg.alpha_pattern)
    lorakit.set_peft_model_state_dict(ours, ref_sd)
    torch.testing.assert_close(_logits(ours, IDS), _logits(ref, IDS), atol=1e-5, rtol=1e-5)
    assert (_logits(ours, IDS) - _logits(tiny(model_type), IDS)).abs().max() > 1e-3


def test_tiny_mixtral_trainable_count_of_the_issue():
    ref, ours = _pair("mixtral", target_modules="all-linear")
    assert ours.get_nb_trainable_parameters()[0] == ref.get_nb_trainable_parameters()[0] > 4 * 1792
    gate_up = ours.base_model.model.model.layers[0].mlp.experts
    assert gate_up.base_layer.parameter_name == "gate_up_proj" and gate_up.parameter_name == "down_proj"
    assert gate_up.base_layer.adapters["default"].r == 16 and gate_up.base_layer.adapters["default"].scaling == 1.0


def test_files_load_both_ways(tmp_path):
    ref, ours = _pair("qwen3_moe", target_modules="all-linear", init_lora_weights=False)
    ref.save_pretrained(tmp_path / "peft")
    loaded = lorakit.PeftModel.from_pretrained(tiny("qwen3_moe"), tmp_path / "peft")
    torch.testing.assert_close(_logits(loaded, IDS), _logits(ref, IDS), atol=1e-5, rtol=1e-5)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny("qwen3_moe"), tmp_path / "ours")
    torch.testing.assert_close(_logits(back, IDS), _logits(ours, IDS), atol=1e-5, rtol=1e-5)
    assert (_logits(back, IDS) - _logits(tiny("qwen3_moe"), IDS)).abs().max() > 1e-3


def test_dense_mlps_stay_targeted_where_peft_drops_them():
    """Deliberate difference: deepseek_v3's dense first layer and shared experts keep LoRA under all-linear."""
    ref, ours = _pair("deepseek_v3", target_modules="all-linear")
    ref_keys, ours_keys = set(peft.get_peft_model_state_dict(ref)), set(lorakit.get_peft_model_state_dict(ours))
    assert ref_keys < ours_keys
    extra = {k.rsplit(".lora_", 1)[0].split("model.layers.")[1] for k in ours_keys - ref_keys}
    assert extra == {
        f"{i}.mlp.{mlp}{proj}"
        for i, mlp in ((0, ""), (1, "shared_experts."))
        for proj in ("gate_proj", "up_proj", "down_proj")
    }


def test_a_regex_for_one_layer_adapts_that_layer():
    """Deliberate difference: PEFT turns the regex into leaf names and adapts every layer's experts and k_proj."""
    regex = r".*\.1\.mlp\.experts\.down_proj|.*\.1\.self_attn\.k_proj"
    ref, ours = _pair("qwen3_moe", target_modules=regex)
    ours_sd = lorakit.get_peft_model_state_dict(ours)
    assert sorted(k.split("model.layers.")[1] for k in ours_sd) == [
        f"1.{module}.lora_{ab}.weight" for module in ("mlp.experts", "self_attn.k_proj") for ab in "AB"
    ]
    assert ours.peft_config["default"].target_parameters == ["model.layers.1.mlp.experts.down_proj"]
    ref_layers = {k.split("model.layers.")[1].split(".")[0] for k in peft.get_peft_model_state_dict(ref)}
    assert ref_layers == {"0", "1"}


def test_a_regex_must_match_both_halves_of_a_fused_projection_in_each_layer():
    with pytest.raises(ValueError, match=r"does not match all of \['w1', 'w3'\] in the same layers.*gate_up_proj"):
        lorakit.get_peft_model(tiny("mixtral"), lorakit.LoraConfig(target_modules=r".*\.0\..*w1|.*w3"))


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_none_keeps_lorakit_defaults_where_peft_raises(model_type):
    with pytest.raises(Exception, match="target_modules"):
        peft.get_peft_model(tiny(model_type), peft.LoraConfig())
    ours = lorakit.get_peft_model(tiny(model_type), lorakit.LoraConfig())
    assert {p.rsplit(".", 1)[-1] for p in _lora_paths(ours, LoraLayer)} == {"q_proj", "v_proj"}
    assert not ours.peft_config["default"].target_parameters


def test_dora_refuses_the_experts_as_peft_does():
    with pytest.raises(ValueError, match="use_dora"):
        peft.get_peft_model(tiny("mixtral"), peft.LoraConfig(target_modules="all-linear", use_dora=True))
    model = tiny("mixtral")
    with pytest.raises(ValueError, match=r"dora.*fused into the parameters \['down_proj', 'gate.weight'"):
        lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules="all-linear", use_dora=True))
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_half_of_a_fused_projection_is_refused():
    with pytest.raises(ValueError, match="w3"):
        peft.get_peft_model(tiny("mixtral"), peft.LoraConfig(target_modules=["w1"]))
    with pytest.raises(ValueError, match=r"\['w1'\] but not \['w3'\].*gate_up_proj"):
        lorakit.get_peft_model(tiny("mixtral"), lorakit.LoraConfig(target_modules=["w1"]))


def test_model_type_table_agrees_with_transformers():
    from transformers.conversion_mapping import _MODEL_TO_CONVERSION_PATTERN

    theirs = {t: f for t, f in _MODEL_TO_CONVERSION_PATTERN.items() if f in ("mixtral", "qwen2_moe") and t.islower()}
    assert {t: f for t, f in MODEL_TYPE_FAMILIES.items() if t != "mixtral"} == theirs


@pytest.mark.parametrize("targets", ["all-linear", r".*\.(q_proj|w1|w3|w2|gate)"])
def test_a_second_adapter_gets_the_same_targets(targets):
    ref = peft.get_peft_model(tiny("mixtral"), peft.LoraConfig(target_modules=targets, init_lora_weights=False))
    ref.add_adapter("two", peft.LoraConfig(target_modules=targets, init_lora_weights=False))
    ours = lorakit.get_peft_model(tiny("mixtral"), lorakit.LoraConfig(target_modules=targets, init_lora_weights=False))
    ours.add_adapter("two", lorakit.LoraConfig(target_modules=targets, init_lora_weights=False))
    for name in ("default", "two"):
        ref_sd = peft.get_peft_model_state_dict(ref, adapter_name=name)
        assert _shapes(lorakit.get_peft_model_state_dict(ours, adapter_name=name)) == _shapes(ref_sd)
        lorakit.set_peft_model_state_dict(ours, ref_sd, adapter_name=name)
    ref.set_adapter("two"), ours.set_adapter("two")
    torch.testing.assert_close(_logits(ours, IDS), _logits(ref, IDS), atol=1e-5, rtol=1e-5)


def test_exclude_modules_naming_the_router_warns_that_it_still_gets_lora():
    """exclude_modules does not apply to target_parameters (as in peft, same adapter), but it is never silent."""
    kwargs = dict(target_modules="all-linear", exclude_modules=["gate"])
    with pytest.warns(UserWarning, match=r"exclude_modules=\['gate'\] names the module\(s\) of .*mlp\.gate\.weight"):
        ours = lorakit.get_peft_model(tiny("mixtral"), lorakit.LoraConfig(**kwargs))
    ref = peft.get_peft_model(tiny("mixtral"), peft.LoraConfig(**kwargs))
    assert _shapes(lorakit.get_peft_model_state_dict(ours)) == _shapes(peft.get_peft_model_state_dict(ref))
