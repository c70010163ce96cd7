"""PEFT's functional API (get/set_peft_model_state_dict), save_pretrained(state_dict=...), ignore_mismatched_sizes."""

from __future__ import annotations

import peft
import pytest
import torch
from io_cases import build, logits, read_saved

import lorakit
from models import BUILDERS


def _same(ours: dict, ref: dict) -> None:
    assert sorted(ours) == sorted(ref)
    for key, value in ref.items():
        torch.testing.assert_close(ours[key], value, atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("case", ["llama_named_adapters", "llama_embeddings", "bert_seq_cls", "mlp_bias_all"])
@pytest.mark.parametrize("save_embedding_layers", ["auto", True, False])
def test_get_peft_model_state_dict_matches_peft(case, save_embedding_layers):
    ref, _ = build(peft, case)
    ours, _ = build(lorakit, case)
    ours.load_state_dict(ref.state_dict())
    for name in ours.peft_config:
        _same(
            lorakit.get_peft_model_state_dict(ours, adapter_name=name, save_embedding_layers=save_embedding_layers),
            peft.get_peft_model_state_dict(ref, adapter_name=name, save_embedding_layers=save_embedding_layers),
        )


def test_set_peft_model_state_dict_under_another_name():
    ref, kind = build(peft, "llama_named_adapters")
    ours = lorakit.get_peft_model(
        BUILDERS["llama"](), lorakit.LoraConfig(target_modules=["k_proj", "down_proj"], r=2, lora_alpha=5)
    )
    result = lorakit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(ref, adapter_name="other"))
    assert result.missing_keys == [] and result.unexpected_keys == []
    ref.set_adapter("other")
    torch.testing.assert_close(logits(ours.eval(), kind), logits(ref, kind), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"'nope' not found; existing adapters: \['default'\]"):
        lorakit.get_peft_model_state_dict(ours, adapter_name="nope")


def test_model_injected_in_place_round_trips_like_peft():
    config = dict(target_modules=["lin0", "head"], r=2, init_lora_weights=False)
    ref = peft.inject_adapter_in_model(peft.LoraConfig(**config), BUILDERS["mlp"]())
    ours = lorakit.inject_adapter_in_model(lorakit.LoraConfig(**config), BUILDERS["mlp"]())
    ref_sd = peft.get_peft_model_state_dict(ref)
    assert (
        sorted(lorakit.get_peft_model_state_dict(ours))
        == sorted(ref_sd)
        == sorted(["lin0.lora_A.weight", "lin0.lora_B.weight", "head.lora_A.weight", "head.lora_B.weight"])
    )
    lorakit.set_peft_model_state_dict(ours, ref_sd)
    x = torch.randn(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=0)


def test_save_pretrained_takes_values_from_a_given_state_dict_and_warns_on_unknown_arguments(tmp_path):
    ours, _ = build(lorakit, "mlp_lora_bias")
    full = {k: v + 1 for k, v in ours.state_dict().items()}
    with pytest.warns(UserWarning, match=r"ignores the keyword arguments \['push_to_hub'\]"):
        ours.save_pretrained(tmp_path, state_dict=full, push_to_hub=True)
    saved = read_saved(tmp_path)[1]
    expected = lorakit.get_peft_model_state_dict(ours, state_dict=full)
    _same(saved, expected)
    assert not torch.equal(
        saved["base_model.model.lin0.lora_A.weight"], ours.base_model.model.lin0.lora_A["default"].weight
    )


def test_ignore_mismatched_sizes_skips_with_a_warning(tmp_path):
    ours, _ = build(lorakit, "mlp_bin")
    ours.save_pretrained(tmp_path)
    model = lorakit.get_peft_model(BUILDERS["mlp"](), lorakit.LoraConfig(target_modules=["lin0", "lin1"], r=3))
    with pytest.raises(
        ValueError, match=r"head\.lora_A\.other\.weight has shape \(2, 16\) in the checkpoint but \(3, 16\)"
    ):
        model.load_adapter(tmp_path, "other", config=lorakit.LoraConfig(target_modules=["lin0", "lin1", "head"], r=3))
    with pytest.warns(UserWarning, match=r"skipped 6 tensors whose shapes differ \(.*lora_A.*: \(2, 10\) vs \(3, 10\)"):
        result = model.load_adapter(
            tmp_path,
            "other",
            config=lorakit.LoraConfig(target_modules=["lin0", "lin1", "head"], r=3),
            ignore_mismatched_sizes=True,
        )
    assert len(result.missing_keys) == 6 and result.unexpected_keys == []
